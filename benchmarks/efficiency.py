"""Efficiency of progressive freezing, measured against the ideal.

For each model size and each number ``k`` of frozen encoder blocks (0 .. max), one real training step of
the reference trainer (``Trainer.train_step``: masking, LayerLock plan, targets, student, loss, backward,
grad clipping, collapse guard, AdamW) is measured for ``freeze-only`` (pixel target) and ``layerlock``
(latent target ``h_k``, which adds the no-grad target pass of the frozen prefix over all tokens):

* **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; counted
  under the MATH attention backend because the CPU flash-attention kernel has no FLOP formula and would
  count as 0) next to the **analytic ideal** (:func:`ideal_step_flops`): every trainable matmul costs its
  forward plus a weight gradient plus an input gradient, the stem convolution (over all N tokens, its
  input is the video) forward + weight gradient; frozen blocks cost their forward only; a latent target
  adds the stem and blocks ``1..k`` forward over all N tokens. Target: within 3% of the ideal.
* **bytes saved for backward** (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters
  excluded), attributed to the unit that was running (stem, block_i, decoder, readouts): frozen units must
  save 0, and the total must not exceed the bound "``k = 0`` total minus what the now-frozen units saved
  at ``k = 0``" (it may undercut it: tensors saved outside any unit, e.g. by the visible-token gather,
  and a latent readout ``D -> D`` that is narrower than the pixel one, also shrink).
* **bytes held in gradients** (read in an optimizer step pre-hook) and **in optimizer state** (after the
  step): zero for frozen units.
* **step time** relative to ``k = 0``: steps of a ``k``-frozen trainer and of a ``k = 0`` trainer alternate,
  median of ``--reps`` pairs each (the machine is shared; the ratio of medians of interleaved steps is
  what survives contention).
* **plugin overhead** in the pixel phase: ``Trainer.train_step`` (LayerLock at step 0, nothing frozen)
  against a hand-written plain MAE step on a copy of the same model and optimizer (same masking, pixel
  targets, loss, clipping, AdamW, LR schedule), interleaved, median. Target: <= 2%.
* **whole-run savings** for the paper's schedule shape (pixels for 32% of the run, then one block every 2%
  of the run until 32/44 of the encoder is frozen at 94%, as 160K + 31 x 10K of 500K steps): FLOPs and the
  step memory model ``params + grads + optimizer state + saved activations`` (CPU: no allocator peak to
  read) from the measured per-``k`` numbers; plus the analytic ideal for the paper's 4DS-G shape (48 blocks,
  decoder 4, 16x224x224 clip, 95% masking) at 500K and 1M steps, next to the paper's 9% FLOPs / 16% memory.

    python benchmarks/efficiency.py --quick        # tiny model only, few reps (about a minute)
    python benchmarks/efficiency.py                # tiny + ViT-B-shaped (4x160x160 clip)
    python benchmarks/efficiency.py --methods layerlock layerlock-q5 layerlock-q5-sparse --tag context
                                                   # what the query subset and the sparse target context cost

Writes ``benchmarks/results/efficiency[-quick].json``, ``.md`` and ``efficiency[-quick].png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, figure, provenance, save_figure, start_run, write_json  # noqa: E402

from layerlock_plugin.masking import num_masked, random_masking  # noqa: E402
from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.model import ModelConfig, VideoMAE  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402
from layerlock_plugin.targets import gather_tokens, pixel_targets  # noqa: E402

#: model sizes: name -> (model overrides, batch size)
SIZES: dict[str, tuple[list[str], int]] = {
    "tiny": (["model.preset=tiny", "model.mask_ratio=0.9"], 8),
    # ViT-B widths and depth (12 blocks, decoder 4, 8 freezable), a short 4-frame 160x160 clip (sized so
    # that a step runs in seconds on a shared 2-core CPU)
    "vitb-4x160": (["model.preset=base", "model.num_frames=4", "model.img_size=160", "model.mask_ratio=0.95"], 1),
}
#: variant -> (trainer method, target overrides). The default study is the first two; the others price
#: the latent target's two cost knobs: queries on 5% of the masked positions (``target.loss_fraction``)
#: and the target pass on the queried + visible tokens only (``target.context=sparse``).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "freeze-only": ("freeze-only", []),
    "layerlock": ("layerlock", []),
    "layerlock-q5": ("layerlock", ["target.loss_fraction=0.05"]),
    "layerlock-q5-sparse": ("layerlock", ["target.loss_fraction=0.05", "target.context=sparse"]),
}
METHODS = ("freeze-only", "layerlock")
COLOURS = {"freeze-only": "tab:orange", "layerlock": "tab:blue", "layerlock-q5": "tab:purple",
           "layerlock-q5-sparse": "tab:green"}


# ------------------------------------------------------------------------------------- analytic ideal
@dataclass(frozen=True)
class Shape:
    """What the FLOP model needs: ``B`` clips, ``N`` tokens, ``V`` visible, ``Q`` queries, width ``D``,
    MLP hidden ``H``, ``L_e`` encoder / ``L_d`` decoder blocks, ``P`` values per patch, ``C`` tokens the
    latent target pass runs on (``N``; ``Q + V`` with ``target.context=sparse``)."""

    B: int
    N: int
    V: int
    Q: int
    D: int
    H: int
    L_e: int
    L_d: int
    P: int
    C: int

    @classmethod
    def of(cls, cfg: ModelConfig, batch: int, loss_fraction: float = 1.0, context: str = "full") -> Shape:
        t, h, w = cfg.grid
        n = t * h * w
        m = num_masked(n, cfg.mask_ratio)
        q = m if loss_fraction >= 1.0 else max(1, math.floor(loss_fraction * m + 0.5))
        pt, ph, pw = cfg.tubelet
        return cls(batch, n, n - m, q, cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio),
                   cfg.depth - cfg.decoder_depth, cfg.decoder_depth, pt * ph * pw * cfg.in_chans,
                   n if context == "full" else q + n - m)


def block_forward_flops(s: Shape, n: int) -> int:
    """One block over ``n`` tokens: qkv, proj, two MLP matmuls (2 FLOPs per MAC) + q@k and attn@v."""
    linear = 2 * s.B * n * (3 * s.D * s.D + s.D * s.D + 2 * s.D * s.H)
    attention = 2 * 2 * s.B * n * n * s.D
    return linear + attention


def ideal_step_flops(s: Shape, k: int, target_layers: list[int]) -> dict[str, int]:
    """The FLOPs a step with ``k`` frozen blocks should cost, by part. ``target_layers``: ``[]`` for the
    pixel target, else the latent target blocks (single: ``[k]``; multi: ``1..k``).

    Trainable matmul: forward + weight grad + input grad = 3x forward (the first trainable block's input
    comes from a no-grad region, but its norm1 is trainable, so its input gradient is still needed).
    Stem: a conv over all N tokens (the gather to visible tokens comes after it), forward + weight grad
    when trainable (the video needs no gradient), forward only when frozen.
    """
    stem = 2 * s.B * s.N * s.D * s.P
    enc = block_forward_flops(s, s.V)
    dec = block_forward_flops(s, s.V + s.Q)
    out_dims = [s.P] if not target_layers else [s.D] * len(target_layers)
    readout = sum(2 * s.B * s.Q * s.D * o for o in out_dims)
    parts = {
        "stem": stem * (1 if k > 0 else 2),
        "frozen_blocks": k * enc,
        "trainable_encoder": 3 * (s.L_e - k) * enc,
        "decoder": 3 * s.L_d * dec,
        "readout": 3 * readout,
        "target_pass": (stem + max(target_layers) * block_forward_flops(s, s.C)) if target_layers else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------- measurement
def build_trainer(size: str, method: str, out: Path, extra: list[str] = ()) -> Trainer:
    """``method``: a trainer method or a :data:`VARIANTS` name."""
    method, variant_sets = VARIANTS.get(method, (method, []))
    extra = [*variant_sets, *extra]
    """A reference trainer whose plan at step ``s`` has ``s`` blocks frozen (up to the maximum)."""
    model_sets, batch = SIZES[size]
    probe = load_config(None, model_sets)
    max_k = probe.model.depth - probe.model.decoder_depth - 1
    cfg = load_config(None, [
        f"out_dir={out}", f"method={method}", *model_sets, "data.num_videos=2", f"train.batch_size={batch}",
        "train.steps=1000", "train.progress=false", "probe.enabled=false", "schedule.pixel_steps=1",
        "schedule.interval=1", f"schedule.max_frozen={max_k}", "warmup.steps=0", "guard.every=1", *extra])
    return Trainer(cfg, echo=lambda s: None)


def sample_video(trainer: Trainer) -> torch.Tensor:
    b = trainer.config.train.batch_size
    return torch.stack([trainer.dataset[i % len(trainer.dataset)]["video"] for i in range(b)])


def unit_of_params(model: VideoMAE) -> dict[int, str]:
    """``id(param) -> unit name`` (stem, block_i, decoder, readouts, other)."""
    owner: dict[int, str] = {}
    units = model.layerlock_units()
    for u in (units.stem, *units.blocks):
        for p in u.params:
            owner[id(p)] = u.name
    for blk in model.blocks[model.encoder_depth:]:
        for p in blk.parameters():
            owner[id(p)] = "decoder"
    for p in model.readouts.parameters():
        owner[id(p)] = "readouts"
    for p in model.parameters():
        owner.setdefault(id(p), "other")
    return owner


@contextlib.contextmanager
def saved_bytes_by_unit(model: VideoMAE) -> Iterator[dict[str, int]]:
    """Count bytes autograd saves for backward (unique storages, parameters excluded), attributed to the
    unit whose forward was running (``other`` outside any unit)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[str] = ["other"]
    handles = []
    units = model.layerlock_units()
    named = [(u.name, m) for u in (units.stem, *units.blocks) for m in u.modules]
    named += [("decoder", b) for b in model.blocks[model.encoder_depth:]] + [("readouts", model.readouts)]
    for name, mod in named:
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: current.append(name)))
        handles.append(mod.register_forward_hook(lambda m, a, o: _pop(current)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in seen and ptr not in param_storages:
            seen.add(ptr)
            counts[current[-1]] = counts.get(current[-1], 0) + st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


def _pop(stack: list[str]) -> None:
    stack.pop()  # a forward hook that returned a value would replace the module's output


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_step(trainer: Trainer, step: int, video: torch.Tensor) -> dict[str, Any]:
    """Run ``trainer``'s step ``step`` once under the FLOP counter and the byte counters."""
    model, opt = trainer.model, trainer.optimizer
    owner = unit_of_params(model)
    grads: dict[str, int] = {}

    def grad_hook(optimizer, args, kwargs):
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    grads[owner[id(p)]] = grads.get(owner[id(p)], 0) + _nbytes(p.grad)

    handle = opt.register_step_pre_hook(grad_hook)
    trainer.step = step
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
                saved_bytes_by_unit(model) as saved:
            trainer.train_step(video)
    finally:
        handle.remove()
    state: dict[str, int] = {}
    for p, st in opt.state.items():
        for v in st.values():
            if torch.is_tensor(v):
                state[owner[id(p)]] = state.get(owner[id(p)], 0) + _nbytes(v)
    params = sum(_nbytes(p) for p in model.parameters())
    plan = trainer.layerlock.plan
    return {"k": plan.num_frozen, "heads": trainer.layerlock.heads(plan), "flops": counter.get_total_flops(),
            "saved_bytes": sum(saved.values()), "saved_by_unit": dict(sorted(saved.items())),
            "grad_bytes": sum(grads.values()), "grad_by_unit": dict(sorted(grads.items())),
            "optim_state_bytes": sum(state.values()), "optim_state_by_unit": dict(sorted(state.items())),
            "param_bytes": params}


def time_pair(run_a, run_b, reps: int) -> tuple[float, float]:
    """Medians (s) of alternating calls to two step functions (one warm-up call each first);
    ``reps=0`` measures nothing (NaN)."""
    if reps <= 0:
        return math.nan, math.nan
    run_a(), run_b()
    ta, tb = [], []
    for _ in range(reps):
        for run, acc in ((run_a, ta), (run_b, tb)):
            t0 = time.perf_counter()
            run()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def plain_mae_step(model: VideoMAE, opt: torch.optim.Optimizer, sched, video: torch.Tensor, gen: torch.Generator,
                   grad_clip: float) -> float:
    """The MAE step without any LayerLock call: mask, normalised pixel targets, predict, MSE, AdamW."""
    vis, masked = random_masking(video.shape[0], model.num_patches, model.cfg.mask_ratio, generator=gen)
    target = gather_tokens(pixel_targets(video, model.cfg.tubelet), masked)
    pred = model(video, vis, masked, heads=("pixels",))["pixels"]
    loss = F.mse_loss(pred, target)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return float(loss.detach())


def plugin_overhead(size: str, reps: int, tmp: Path) -> dict[str, Any]:
    """LayerLock's ``train_step`` in the pixel phase vs the plain step on a copy of the same model."""
    with warnings.catch_warnings():  # "the schedule never freezes in this run" is the point here
        warnings.simplefilter("ignore", UserWarning)
        tr = build_trainer(size, "layerlock", tmp / f"{size}-overhead", ["schedule.pixel_steps=100000"])
    video = sample_video(tr)
    model, opt = copy.deepcopy(tr.model), None
    from layerlock_plugin.reference.train.optim import cosine_with_warmup, param_groups

    c = tr.config.optim
    opt = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr, betas=tuple(c.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(1000, c.warmup_steps, c.min_lr_ratio))
    gen = torch.Generator().manual_seed(1)
    model.train()
    tr.model.train()

    def plugin() -> None:
        tr.step = 0  # stay in the pixel phase
        tr.train_step(video)

    def plain() -> None:
        plain_mae_step(model, opt, sched, video, gen, c.grad_clip)

    # FLOPs of both (same masking sizes): the plugin adds no matmul work in the pixel phase
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fa:
        plugin()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fb:
        plain()
    t_plain, t_plugin = time_pair(plain, plugin, reps)
    return {"plain_s": t_plain, "plugin_s": t_plugin, "overhead": t_plugin / t_plain - 1 if reps else math.nan,
            "plain_flops": fb.get_total_flops(), "plugin_flops": fa.get_total_flops(), "reps": reps}


def measure_size(size: str, reps: int, tmp: Path, log, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    baseline = build_trainer(size, "mae", tmp / f"{size}-mae")
    video = sample_video(baseline)
    cfg = baseline.config.model
    shape = Shape.of(cfg, baseline.config.train.batch_size)
    max_k = baseline.layerlock.schedule.max_frozen
    base = measure_step(baseline, 0, video)

    def run_base() -> None:
        baseline.step = 0
        baseline.train_step(video)

    rows = []
    for method in methods:
        tr = build_trainer(size, method, tmp / f"{size}-{method}")
        t = tr.config.target
        method_shape = Shape.of(cfg, baseline.config.train.batch_size, t.loss_fraction, t.context)
        for k in range(max_k + 1):
            m = measure_step(tr, k, video)  # step k of this schedule has k blocks frozen
            assert m["k"] == k, (m["k"], k)
            layers = [] if m["heads"] == ["pixels"] else [int(h.split("_")[1]) for h in m["heads"]]
            ideal = ideal_step_flops(method_shape, k, layers)
            frozen_units = ["stem"] * (k > 0) + [f"block_{i}" for i in range(1, k + 1)]
            saved_ideal = base["saved_bytes"] - sum(base["saved_by_unit"].get(u, 0) for u in frozen_units)

            def run_k(k=k) -> None:
                tr.step = k
                tr.train_step(video)

            t0, tk = time_pair(run_base, run_k, reps)
            row = {"method": method, **m, "ideal_flops": ideal["total"], "ideal_parts": ideal,
                   "flops_gap": m["flops"] / ideal["total"] - 1, "flops_vs_mae": m["flops"] / base["flops"],
                   "saved_bytes_ideal": saved_ideal,
                   "frozen_units_saved_bytes": sum(m["saved_by_unit"].get(u, 0) for u in frozen_units),
                   "frozen_units_grad_bytes": sum(m["grad_by_unit"].get(u, 0) for u in frozen_units),
                   "frozen_units_state_bytes": sum(m["optim_state_by_unit"].get(u, 0) for u in frozen_units),
                   "memory_model_bytes": m["param_bytes"] + m["grad_bytes"] + m["optim_state_bytes"] + m["saved_bytes"],
                   "time_s": tk, "time_k0_s": t0, "time_ratio": tk / t0 if reps else math.nan}
            rows.append(row)
            log(f"  {size:>10} {method:>19} k={k}: flops {m['flops'] / 1e9:8.3f} G (ideal gap {row['flops_gap']:+.2%}, "
                f"x{row['flops_vs_mae']:.3f} MAE), saved {m['saved_bytes'] / 2**20:7.1f} MiB "
                f"(ideal {saved_ideal / 2**20:7.1f}), grads {m['grad_bytes'] / 2**20:6.1f} MiB, "
                f"state {m['optim_state_bytes'] / 2**20:6.1f} MiB, time x{row['time_ratio']:.3f}")
        del tr
    base_row = {**base, "ideal_flops": ideal_step_flops(shape, 0, [])["total"],
                "memory_model_bytes": base["param_bytes"] + base["grad_bytes"] + base["optim_state_bytes"] + base["saved_bytes"]}
    return {"size": size, "model": cfg.to_dict(), "batch": baseline.config.train.batch_size,
            "shape": shape.__dict__, "max_k": max_k, "mae": base_row, "rows": rows}


# ------------------------------------------------------------------------------------- whole run
def paper_shape_schedule(total: int, freezable: int) -> list[tuple[int, int]]:
    """``[(steps, k), ...]``: pixels for 32% of ``total``, then one more block every 2% of the run (the
    paper's 160K + n x 10K of 500K) until ``round(32/44 * freezable)`` blocks, the last at 94%."""
    max_k = max(1, min(freezable - 1, round(32 / 44 * freezable)))
    start, end = 0.32 * total, 0.94 * total
    events = [round(start + i * (end - start) / max(1, max_k - 1)) for i in range(max_k)]
    bounds = [0, *events, total]
    return [(bounds[i + 1] - bounds[i], i) for i in range(len(bounds) - 1)]


def whole_run(per_k: dict[int, dict[str, float]], schedule: list[tuple[int, int]], base: dict[str, float]) -> dict[str, float]:
    total = sum(n for n, _ in schedule)
    flops = sum(n * per_k[k]["flops"] for n, k in schedule)
    mem = [per_k[k]["memory_model_bytes"] for _, k in schedule]
    return {"flops_saving": 1 - flops / (total * base["flops"]),
            "memory_saving_final_stage": 1 - mem[-1] / base["memory_model_bytes"],
            "memory_saving_step_weighted": 1 - sum(n * per_k[k]["memory_model_bytes"] for n, k in schedule)
            / (total * base["memory_model_bytes"]),
            "memory_saving_run_peak": 1 - max(mem) / base["memory_model_bytes"],
            "max_k": schedule[-1][1]}


def paper_4ds_g(total_steps: int) -> dict[str, float]:
    """Analytic ideal for the paper's shape: 4DS-G (48 blocks, width 1664, MLP 8192, decoder 4),
    16x224x224 clips with 2x16x16 tubelets (N = 1568), 95% masking; paper schedule 160K + 31 x 10K."""
    cfg = ModelConfig.preset("giant")
    s = Shape.of(cfg, 1)
    events = [160_000 + i * 10_000 for i in range(32)]
    bounds = [0, *events, total_steps]
    sched = [(bounds[i + 1] - bounds[i], i) for i in range(len(bounds) - 1)]
    mae = ideal_step_flops(s, 0, [])["total"]
    fo = sum(n * ideal_step_flops(s, k, [])["total"] for n, k in sched)
    ll = sum(n * ideal_step_flops(s, k, [k] if k else [])["total"] for n, k in sched)
    # the paper's "5% patches": queries and loss on 5% of the masked positions (the target pass is unchanged),
    # and with the target pass on those queries + the visible tokens only (target.context=sparse)
    s5 = Shape.of(cfg, 1, loss_fraction=0.05)
    ll5 = sum(n * ideal_step_flops(s5, k, [k] if k else [])["total"] for n, k in sched)
    s5c = Shape.of(cfg, 1, loss_fraction=0.05, context="sparse")
    ll5c = sum(n * ideal_step_flops(s5c, k, [k] if k else [])["total"] for n, k in sched)
    return {"steps": total_steps, "freeze_only_flops_saving": 1 - fo / (total_steps * mae),
            "layerlock_flops_saving": 1 - ll / (total_steps * mae),
            "layerlock_5pct_queries_flops_saving": 1 - ll5 / (total_steps * mae),
            "layerlock_5pct_sparse_flops_saving": 1 - ll5c / (total_steps * mae),
            # the same against an MAE whose decoder also has queries on 5% of the masked positions only
            "layerlock_5pct_sparse_vs_mae_5pct_saving": 1 - ll5c / (total_steps * ideal_step_flops(s5, 0, [])["total"]),
            "step_ratio_k32_layerlock_5pct_sparse": ideal_step_flops(s5c, 32, [32])["total"] / mae,
            "step_ratio_k32_freeze_only": ideal_step_flops(s, 32, [])["total"] / mae,
            "step_ratio_k32_layerlock": ideal_step_flops(s, 32, [32])["total"] / mae}


# ------------------------------------------------------------------------------------- report
def plot(results: list[dict[str, Any]], path: Path) -> Path:
    fig = figure(13, 4 * len(results))
    axes = fig.subplots(len(results), 3, squeeze=False)
    for row_axes, res in zip(axes, results):
        for method in dict.fromkeys(r["method"] for r in res["rows"]):
            colour = COLOURS.get(method, "gray")
            rows = [r for r in res["rows"] if r["method"] == method]
            ks = [r["k"] for r in rows]
            row_axes[0].plot(ks, [r["flops_vs_mae"] for r in rows], "o-", color=colour, label=f"{method} measured")
            row_axes[0].plot(ks, [r["ideal_flops"] / res["mae"]["flops"] for r in rows], "x--", color=colour,
                             label=f"{method} ideal")
            row_axes[1].plot(ks, [r["saved_bytes"] / res["mae"]["saved_bytes"] for r in rows], "o-", color=colour,
                             label=f"{method} activations")
            row_axes[1].plot(ks, [(r["grad_bytes"] + r["optim_state_bytes"])
                                  / (res["mae"]["grad_bytes"] + res["mae"]["optim_state_bytes"]) for r in rows],
                             "s:", color=colour, label=f"{method} grads+state")
            row_axes[2].plot(ks, [r["time_ratio"] for r in rows], "o-", color=colour, label=method)
        for ax, title in zip(row_axes, ("step FLOPs / MAE", "bytes / MAE", "step time / k=0 (median)")):
            ax.set_xlabel("frozen blocks k")
            ax.set_title(f"{res['size']}: {title}")
            ax.axhline(1.0, color="gray", lw=0.5)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def markdown(payload: dict[str, Any]) -> str:
    meta = payload["provenance"]
    out = [f"Measured {meta['date_utc']} on {meta['machine']}, torch {meta['torch']}, {meta['torch_threads']} threads. "
           f"Command: `{meta['command']}`", ""]
    for res in payload["sizes"]:
        s = res["shape"]
        out.append(f"**{res['size']}** (D={s['D']}, {s['L_e']} encoder + {s['L_d']} decoder blocks, N={s['N']} tokens, "
                   f"V={s['V']} visible, Q={s['Q']} queries with a loss at target.loss_fraction=1, batch {s['B']}; MAE step {res['mae']['flops'] / 1e9:.3f} GFLOP, "
                   f"ideal {res['mae']['ideal_flops'] / 1e9:.3f})")
        out.append("")
        out.append("| method | k | GFLOP | ideal | gap | vs MAE | saved for bwd MiB (bound) | frozen units: saved / grad / state B "
                   "| grads MiB | optim state MiB | time / k=0 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            out.append(f"| {r['method']} | {r['k']} | {r['flops'] / 1e9:.3f} | {r['ideal_flops'] / 1e9:.3f} | "
                       f"{r['flops_gap']:+.2%} | {r['flops_vs_mae']:.3f} | {r['saved_bytes'] / 2**20:.2f} "
                       f"({r['saved_bytes_ideal'] / 2**20:.2f}) | {r['frozen_units_saved_bytes']} / "
                       f"{r['frozen_units_grad_bytes']} / {r['frozen_units_state_bytes']} | {r['grad_bytes'] / 2**20:.2f} | "
                       f"{r['optim_state_bytes'] / 2**20:.2f} | {r['time_ratio']:.3f} |")
        out.append("")
    out.append("Plugin overhead in the pixel phase (LayerLock `train_step` vs plain MAE step, same model, interleaved medians):")
    out.append("")
    out.append("| size | plain ms | plugin ms | overhead | plain GFLOP | plugin GFLOP | pairs |")
    out.append("|---|---|---|---|---|---|---|")
    for size, o in payload["overhead"].items():
        out.append(f"| {size} | {o['plain_s'] * 1e3:.1f} | {o['plugin_s'] * 1e3:.1f} | {o['overhead']:+.2%} | "
                   f"{o['plain_flops'] / 1e9:.3f} | {o['plugin_flops'] / 1e9:.3f} | {o['reps']} |")
    out.append("")
    out.append("Whole run, paper schedule shape (measured per-k numbers weighted by steps):")
    out.append("")
    out.append("| size | method | frozen at end | FLOPs saving | memory saving, final stage | step-weighted | run peak |")
    out.append("|---|---|---|---|---|---|---|")
    for size, per in payload["whole_run"].items():
        for method, w in per.items():
            out.append(f"| {size} | {method} | {w['max_k']} | {w['flops_saving']:.1%} | {w['memory_saving_final_stage']:.1%} | "
                       f"{w['memory_saving_step_weighted']:.1%} | {w['memory_saving_run_peak']:.1%} |")
    out.append("")
    out.append("Analytic ideal for the paper's 4DS-G shape (paper: 9% FLOPs / 16% peak memory for freezing alone; "
               "19% FLOPs at 1B samples):")
    out.append("")
    out.append("| steps | freeze-only FLOPs saving | layerlock FLOPs saving | layerlock, 5% queries | "
               "5% queries + sparse context | same, vs MAE with 5% queries | step at k=32 / MAE, freeze-only | "
               "layerlock | 5% + sparse |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for g in payload["paper_4ds_g"]:
        out.append(f"| {g['steps']:,} | {g['freeze_only_flops_saving']:.1%} | {g['layerlock_flops_saving']:.1%} | "
                   f"{g['layerlock_5pct_queries_flops_saving']:.1%} | {g['layerlock_5pct_sparse_flops_saving']:.1%} | "
                   f"{g['layerlock_5pct_sparse_vs_mae_5pct_saving']:.1%} | "
                   f"{g['step_ratio_k32_freeze_only']:.3f} | {g['step_ratio_k32_layerlock']:.3f} | "
                   f"{g['step_ratio_k32_layerlock_5pct_sparse']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, 3 timing pairs")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None)
    p.add_argument("--reps", type=int, default=None, help="timing pairs per k (default 15 tiny / 3 larger; quick 2; 0: no timing)")
    p.add_argument("--overhead-reps", type=int, default=None, help="timing pairs for the overhead (default 60 tiny / 10 larger; quick 3)")
    p.add_argument("--methods", nargs="+", choices=sorted(VARIANTS), default=list(METHODS),
                   help="variants to measure against MAE (default: freeze-only layerlock)")
    add_run_args(p)
    args = p.parse_args(argv)
    suffix = start_run(args)
    sizes = args.sizes or (["tiny"] if args.quick else list(SIZES))
    meta = provenance()
    results, overhead, whole = [], {}, {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for size in sizes:
            reps = args.reps if args.reps is not None else (2 if args.quick else (15 if size == "tiny" else 3))
            print(f"efficiency: {size}, {reps} timing pairs per k", flush=True)
            torch.manual_seed(0)
            res = measure_size(size, reps, tmp, lambda s: print(s, flush=True), tuple(args.methods))
            results.append(res)
            o_reps = (args.overhead_reps if args.overhead_reps is not None
                      else (3 if args.quick else (60 if size == "tiny" else 10)))
            overhead[size] = plugin_overhead(size, o_reps, tmp)
            print(f"  overhead {size}: {overhead[size]['overhead']:+.2%} ({o_reps} pairs)", flush=True)
            whole[size] = {}
            for method in args.methods:
                per_k = {r["k"]: r for r in res["rows"] if r["method"] == method}
                sched = paper_shape_schedule(500_000, res["max_k"] + 1)
                whole[size][method] = whole_run(per_k, sched, res["mae"])
    payload = {"study": "efficiency", "provenance": meta, "sizes": results, "overhead": overhead,
               "whole_run": whole, "paper_4ds_g": [paper_4ds_g(500_000), paper_4ds_g(1_000_000)]}
    out = Path(args.results_dir)
    write_json(out / f"efficiency{suffix}.json", payload)
    md = markdown(payload)
    (out / f"efficiency{suffix}.md").write_text(md)
    plot(results, out / f"efficiency{suffix}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
