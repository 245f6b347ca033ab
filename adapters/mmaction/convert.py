"""LayerLock pretraining checkpoint -> backbone-only checkpoint for mmaction2's VideoMAE fine-tuning.

    python -m layerlock_plugin.adapters.mmaction.convert work_dirs/layerlock/iter_200000.pth vit-b_layerlock.pth

The pretraining model's backbone *is* mmaction2's ``VisionTransformer``, so its keys
(``backbone.patch_embed.projection.*``, ``backbone.blocks.i.*``, ``backbone.fc_norm.*``, ...) already
match ``Recognizer3D``'s. The converter keeps only those (the decoder, mask token and readouts are
pretraining-only), strips wrapper prefixes (``module.``, ``_orig_mod.``), and writes
``{'state_dict': ..., 'meta': ...}`` atomically. Use the result in a stock fine-tuning config, e.g.
``configs/recognition/videomae/vit-base-p16_videomae-k400-pre_16x4x1_kinetics-400.py``, with
``load_from='vit-b_layerlock.pth'`` (only the classification head is then reported missing) or with
``model.backbone.init_cfg=dict(type='Pretrained', checkpoint='vit-b_layerlock.pth', prefix='backbone.')``.
Both the input and the output load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from layerlock_plugin.checkpoint import load_checkpoint, save_atomic, strip_wrapper_prefixes
from layerlock_plugin.errors import CheckpointError

__all__ = ["backbone_state_dict", "convert"]


def backbone_state_dict(checkpoint: dict, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The ``backbone.*`` tensors of a LayerLockVideoMAE checkpoint (an mmengine checkpoint dict with
    ``state_dict``, or a bare state dict), wrapper prefixes removed, keys kept with ``prefix``."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        key = strip_wrapper_prefixes(key)
        if key.startswith(prefix) and isinstance(value, torch.Tensor):
            out[key] = value
    if not out:
        raise CheckpointError(
            f"no '{prefix}*' tensors in the checkpoint (found e.g. {sorted(state)[:5]}); is it a "
            f"LayerLockVideoMAE checkpoint?"
        )
    return out


def convert(src: str | Path, dst: str | Path) -> Path:
    """Read ``src`` (weights_only), write the backbone-only checkpoint to ``dst`` atomically."""
    checkpoint = load_checkpoint(src)
    state = backbone_state_dict(checkpoint)
    meta = {"converted_from": str(src), "layerlock": checkpoint.get("layerlock", {})}
    return save_atomic({"state_dict": state, "meta": meta}, dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="LayerLockVideoMAE checkpoint written by mmaction2's tools/train.py")
    parser.add_argument("dst", help="output: backbone-only checkpoint for a Recognizer3D config")
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst)
    n = len(torch.load(out, weights_only=True)["state_dict"])
    print(f"wrote {out} ({n} backbone tensors)")


if __name__ == "__main__":
    main()
