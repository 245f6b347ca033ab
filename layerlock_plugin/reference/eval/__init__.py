"""Frozen-feature probes: motion and appearance classification, dense per-patch depth regression.

The modules, one per part: :mod:`.config` (:class:`ProbeConfig`), :mod:`.features` (encoding the probe
videos, feature normalisation, pooling), one module per probe kind (:mod:`.linear`: logistic and ridge,
:mod:`.knn`, :mod:`.attentive`), :mod:`.suite` (every probe on one encoder, regularisation chosen on
held-out probe-train videos, chance, the report line), :mod:`.trained_run` (a trained run's encoder
beside its random init) and :mod:`.calibration` (the instruments of known quality the probes are
checked against: hand-made motion features, raw pixels, a supervised encoder).

The encoder is frozen; only small read-outs are trained on its tokens ``[n, N, D]`` (order ``(t h w)``
on the grid ``(T', H', W')``).

**Feature normalisation first** (``ProbeConfig.normalize``), with statistics of the probe-train
tokens only: ``'standardize'`` (default: per channel, zero mean and unit variance over all probe-train
tokens), ``'whiten'`` (the probe-train covariance mapped to the identity, ZCA), ``'layer_norm'`` (each
token by its own mean and scale, no affine) or ``'none'``. Trained encoders put most of their variance
in a few directions; a per-token layer norm rescales every token by that dominant scale and drowns the
small directions that carry the labels, per-channel standardisation keeps them.

* **Classification** (``motion``, ``appearance``): every kind in ``ProbeConfig.kinds`` is fitted and
  reported as ``<task>_<kind>_acc``; ``ProbeConfig.kind`` is the headline one, also reported as
  ``<task>_acc``.

  - ``'linear'``: multinomial logistic regression (L-BFGS, full batch) on pooled tokens
    (``pooling``: ``'mean'`` over all tokens, ``'temporal_slots'`` = spatial mean per temporal slot,
    concatenated, or ``'tokens_pca'`` = every token projected on the top-``pca_dim`` principal
    directions, concatenated: a weight per token position).
  - ``'attentive'`` (as in V-JEPA / 4DS / LayerLock): normalised tokens plus a fixed 3D sin-cos
    embedding of the token grid (:func:`~layerlock_plugin.reference.model.rope.sincos_pos_embed_3d`;
    a RoPE encoder puts no absolute position in its tokens, the probe knows the layout) -> one ``nn.MultiheadAttention(attn_dim,
    attn_heads, kdim=D, vdim=D)`` from a learned query token -> LayerNorm (no affine) -> linear
    classifier. Trained full batch with AdamW for ``steps`` steps (``lr``, cosine decay to 0) from a
    seeded initialisation. See :class:`~.attentive.AttentiveProbes` for how the single-query attention runs on
    :func:`torch.nn.functional.scaled_dot_product_attention` without keys and values for every token.
  - ``'knn'``: k nearest probe-train neighbours of the pooled features by cosine similarity, votes
    weighted by ``exp(similarity / knn_temperature)`` (DINO's k-NN evaluation).

* **Dense** (``depth``): the target of each token is the mean depth over the pixels of its tubelet
  (``depth [T, H, W]`` average-pooled by the tubelet to the token grid). The probe is one linear
  ridge regression ``D -> 1`` shared by all tokens, solved in closed form.

**Chance** is reported twice per task: ``<task>_chance_uniform = 1 / K`` with ``K`` the dataset's
number of classes (``dataset.num_classes[task]``, not the labels that happen to occur) and
``<task>_chance_majority``, the share of the most frequent class on the test set.

Regularisation (``l2`` for the logistic and ridge probes, ``weight_decay`` for the attentive ones,
``knn_k`` for k-NN) is a single value or a small grid. With a grid, each probe picks its value on a
**held-out split of the probe-train videos** (``val_fraction`` of them, drawn with ``seed``; held-out
accuracy, held-out cross-entropy breaking ties, ties going to the stronger penalty / more neighbours),
then refits on all probe-train videos with that value. The test set is only ever used for the final
score. The chosen values are reported as ``<task>_linear_l2``, ``<task>_attentive_weight_decay``,
``<task>_knn_k`` and ``dense_l2``. The normalisation statistics always come from all probe-train
videos (they use no label).

Objectives (``W`` excludes the bias, which is never penalised)::

    logistic:  mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2
    ridge:     mean_j (x_j w + b - y_j)^2 + l2 * ||w||^2       (j runs over every token of every video)
    attentive: mean_i CE(probe(tokens_i), y_i), AdamW with decoupled weight decay on the query and
               the weight matrices (not on biases)

Everything is deterministic for a given seed (zero or seeded initialisation, seeded split, float64
linear solves, full-batch attentive training on one intra-op thread).
"""

from .attentive import AttentiveProbes, attentive_inputs, fit_attentive
from .config import ProbeConfig
from .features import (
    extract_features,
    fit_feature_norm,
    pool_features,
    pool_temporal_slots,
    pool_tokens_pca,
    token_depth_targets,
)
from .knn import fit_knn
from .linear import fit_logistic, fit_ridge
from .suite import probe_features, probe_report, run_probes

__all__ = [
    "ProbeConfig",
    "extract_features",
    "token_depth_targets",
    "fit_feature_norm",
    "pool_features",
    "pool_temporal_slots",
    "pool_tokens_pca",
    "AttentiveProbes",
    "attentive_inputs",
    "fit_attentive",
    "fit_knn",
    "fit_logistic",
    "fit_ridge",
    "probe_features",
    "probe_report",
    "run_probes",
]
