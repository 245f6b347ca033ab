"""Shared pieces of the lightly examples: the digits data, the tiny lightly MAE, the linear probe.

Data: scikit-learn's handwritten digits (1797 8x8 grey images, shipped with scikit-learn, no download),
upscaled to 32x32 and repeated to 3 channels, normalised to zero mean / unit std. Pretraining uses the
first 1400 images (without labels); the probe is fitted on their features and tested on the other 397.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from layerlock_plugin.errors import MissingDependencyError


def require_adapter(module: str):
    """Import a LayerLock adapter; without its host framework, exit with the adapter's one-line error
    (it names the pip extra to install) instead of a traceback."""
    import importlib

    try:
        return importlib.import_module(f"layerlock_plugin.adapters.{module}")
    except MissingDependencyError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: {e}")


LayerLockMAE = require_adapter("lightly_mae").LayerLockMAE  # before anything imports lightly itself

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from layerlock_plugin.controller import LayerLockConfig  # noqa: E402
from layerlock_plugin.schedule import ScheduleConfig  # noqa: E402
from layerlock_plugin.warmup import WarmupConfig  # noqa: E402

IMG, PATCH, DEPTH, DIM, HEADS = 32, 4, 6, 96, 3
N_TRAIN = 1400


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``images [1797, 3, 32, 32]`` (float, normalised) and ``labels [1797]``."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0          # [N, 1, 8, 8]
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target)


def build_backbone_and_decoder() -> tuple[MaskedVisionTransformerTIMM, MaskedVisionTransformerDecoderTIMM]:
    """lightly's MAE example, scaled down: a timm ViT in MaskedVisionTransformerTIMM +
    MaskedVisionTransformerDecoderTIMM (LayerLockMAE adds the decoder's input embedding and pixel head)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                            depth=DEPTH, embed_dim=DIM, num_heads=HEADS)
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MaskedVisionTransformerDecoderTIMM(num_patches=vit.patch_embed.num_patches, embed_dim=64, depth=1,
                                                 num_heads=2, num_prefix_tokens=vit.num_prefix_tokens)
    return backbone, decoder


def layerlock_config(method: str, steps: int) -> LayerLockConfig:
    """Pixels for the first 40% of the run, then freeze 1 block every 12.5% up to 3 of 6 blocks."""
    cfg = LayerLockConfig(schedule=ScheduleConfig(pixel_steps=int(0.4 * steps), interval=max(1, steps // 8),
                                                  max_frozen=3),
                          warmup=WarmupConfig(steps=max(1, steps // 40)))
    return cfg.with_method(method)


@torch.no_grad()
def features(backbone: MaskedVisionTransformerTIMM, images: torch.Tensor) -> np.ndarray:
    """Frozen, mean-pooled patch features after the final norm: ``[N, D]``."""
    backbone.eval()
    out = []
    for chunk in images.split(256):
        tokens = backbone.encode(chunk)                                  # [B, prefix + N, D]
        out.append(tokens[:, backbone.vit.num_prefix_tokens:].mean(1))
    return torch.cat(out).numpy()


def probe(backbone: MaskedVisionTransformerTIMM, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Linear probe: logistic regression on frozen features, fitted on the 1400 pretraining images,
    accuracy on the 397 held-out digits (never seen in pretraining)."""
    x = features(backbone, images)
    y = labels.numpy()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    clf.fit(x[:N_TRAIN], y[:N_TRAIN])
    return float(np.mean(clf.predict(x[N_TRAIN:]) == y[N_TRAIN:]))


def example_args(description: str, **extra: str):
    """The command line both examples share (``extra``: more ``--name default`` string options)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["mae", "layerlock"],
                        choices=["mae", "layerlock", "freeze-only", "latent-naive"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    for name, default in extra.items():
        parser.add_argument(f"--{name}", default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


class _NoCloudTips(logging.Filter):
    """Lightning's "💡 Tip: ... cloud ..." lines advertise hosted services; nothing in this example needs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence what a user of this example cannot act on: Lightning's cloud tips and its own internal
    deprecation of ``LeafSpec`` (lightning's code, not the example's). Lightning's other messages stay."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoCloudTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
