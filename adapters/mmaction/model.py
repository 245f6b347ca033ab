"""The LayerLock pretraining model for mmaction2, built on mmaction2's own ``VisionTransformer``.

Config (registered as ``LayerLockVideoMAE`` in mmaction2's ``MODELS`` and in mmengine's root
``MODELS``, so it builds with ``default_scope='mmaction'`` and with ``custom_imports`` alone)::

    model = dict(
        type='LayerLockVideoMAE',
        backbone=dict(type='VisionTransformer', img_size=224, patch_size=16, embed_dims=768, depth=12,
                      num_heads=12, num_frames=16, norm_cfg=dict(type='LN', eps=1e-6)),
        decoder=dict(embed_dims=384, depth=4, num_heads=6),      # VideoMAE's decoder
        mask=dict(type='tube', ratio=0.9),                        # or type='random'
        data_preprocessor=dict(type='ActionDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], format_shape='NCTHW'))

One step (``mode='loss'``), for a clip ``[B, C, T, H, W]`` with ``N`` tubelet tokens:

1. masks from :mod:`layerlock_plugin.masking` (tube or random), drawn from a generator seeded by
   ``(seed, step, rank)`` so that a resumed run draws exactly the masks of the uninterrupted one;
   the ``loss_fraction`` of the hook's target config picks the query subset ``Q`` of the masked tokens;
2. targets from the LayerLock controller that :class:`~.hook.LayerLockHook` attaches: per-patch
   normalised pixels, then the output ``h_k`` of the newest frozen block on the full, unmasked clip
   (eval mode, no autograd, stopping at block ``k``). Pixel targets are taken from the clip as the
   data preprocessor hands it over (mean/std-normalised per channel); VideoMAE undoes that first. The
   per-patch normalisation removes most of the difference (what is left is the per-channel scale
   inside a patch);
3. the student: the backbone's own ``patch_embed`` + ``pos_embed`` and blocks on the visible tokens
   (the frozen prefix without autograd), its ``norm``/``fc_norm`` per token;
4. VideoMAE's decoder (``encoder_to_decoder``, a mask token, fixed sin-cos positions, mmaction2's
   ``Block``) over visible + query tokens, then one linear readout per target head;
5. the loss (MSE, mean over heads) and the collapse guard (``controller.end_step``), before backward.

Readout heads exist from the start for every target the run can use (``pixels``, ``layer_1`` ..
``layer_{depth-1}``) and all require grad when the model is built, so whatever optimizer constructor
mmengine runs (``paramwise_cfg``, layer decay: they skip parameters that do not require grad) gives
every head its per-parameter rules: no param-group surgery at a switch and fixed checkpoint keys.
From ``before_train`` on only the heads in use have ``requires_grad=True`` (the hook sets it), so
DDP, rebuilt by the hook at each change, sees only parameters that get gradients.

The backbone's state-dict keys are exactly those of mmaction2's ``VisionTransformer`` under
``backbone.``; :mod:`.convert` extracts them for the stock VideoMAE fine-tuning configs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerlock_plugin.encoder import EncoderUnits, FreezeUnit, block_name, check_layers
from layerlock_plugin.errors import ConfigError
from layerlock_plugin.masking import random_masking, subsample_indices, tube_masking
from layerlock_plugin.targets import PIXELS, gather_tokens, head_name

from mmaction.models.backbones.vit_mae import Block, get_sinusoid_encoding
from mmaction.registry import MODELS
from mmengine.model import BaseModel
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope

__all__ = ["LayerLockVideoMAE", "MMActionViTEncoder", "build_in_mmaction_scope"]

_DECODER_DEFAULTS = dict(embed_dims=384, depth=4, num_heads=6, mlp_ratio=4.0)
_MASK_DEFAULTS = dict(type="tube", ratio=0.9)
_DEFAULT_PREPROCESSOR = dict(
    type="ActionDataPreprocessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    format_shape="NCTHW",
)


def build_in_mmaction_scope(cfg: dict | nn.Module) -> nn.Module:
    """Build an mmaction2 model component from its config, resolving bare type names in mmaction2's
    registry even when the runner's default scope is mmengine's (config without ``default_scope``).
    """
    if isinstance(cfg, nn.Module):
        return cfg
    scope = None if "." in str(cfg.get("type", "")) else "mmaction"
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(cfg)


def _checked_keys(field: str, given: dict | None, defaults: dict) -> dict:
    """``defaults`` updated with ``given``; an unknown key is a :class:`ConfigError` naming it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]}", f"unknown key; allowed keys: {', '.join(defaults)}")
    return {**defaults, **given}


class MMActionViTEncoder:
    """mmaction2's ``VisionTransformer`` seen through LayerLock's layered-encoder protocol.

    Not an ``nn.Module``: it only points at the backbone's submodules, so the model's state dict keeps
    exactly the backbone's keys. The stem is ``patch_embed`` (+ ``pos_drop``; + ``pos_embed`` when it
    is learnable, a ``Parameter``); every block of ``backbone.blocks`` is freezable (the decoder is
    separate).
    """

    def __init__(self, backbone: nn.Module, field: str = "model.backbone"):
        missing = [a for a in ("patch_embed", "blocks", "pos_embed", "pos_drop", "norm") if not hasattr(backbone, a)]
        blocks = getattr(backbone, "blocks", None)
        if missing or not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) < 2:
            what = f"lacks {missing}" if missing else (
                f"has blocks={type(blocks).__name__} of length {len(blocks) if blocks is not None else 0}")
            raise ConfigError(
                field,
                f"must be mmaction2's VisionTransformer (a patch embedding, pos_embed and at least 2 "
                f"transformer blocks in .blocks); {type(backbone).__name__} {what}",
            )
        self.backbone = backbone
        self.tubelet = tuple(int(s) for s in backbone.patch_embed.projection.kernel_size)  # (pt, ph, pw)

    @property
    def num_layers(self) -> int:
        return len(self.backbone.blocks)

    def layerlock_units(self) -> EncoderUnits:
        b = self.backbone
        extra = (b.pos_embed,) if isinstance(b.pos_embed, nn.Parameter) else ()
        stem = FreezeUnit("stem", modules=(b.patch_embed, b.pos_drop), extra_params=extra)
        blocks = tuple(FreezeUnit(block_name(i + 1), modules=(blk,)) for i, blk in enumerate(b.blocks))
        return EncoderUnits(stem=stem, blocks=blocks)

    def grid(self, video: torch.Tensor) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')`` of ``video [B, C, T, H, W]``; it must match ``pos_embed``."""
        pt, ph, pw = self.tubelet
        _, _, t, h, w = video.shape
        grid = (t // pt, h // ph, w // pw)
        n = grid[0] * grid[1] * grid[2]
        if n != self.backbone.pos_embed.shape[1] or (grid[1], grid[2]) != tuple(self.backbone.grid_size):
            raise ValueError(
                f"clip of shape {tuple(video.shape)} gives a {grid} token grid ({n} tokens) but the backbone "
                f"was built for {self.backbone.pos_embed.shape[1]} tokens (img_size / num_frames in "
                f"model.backbone must match the pipeline's crop size and clip_len)"
            )
        return grid

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, N, D]``: patch embedding + positions (+ dropout), as the backbone does."""
        self.grid(video)
        x = self.backbone.patch_embed(video)[0]
        return self.backbone.pos_drop(x + self.backbone.pos_embed)

    def forward_prefix(self, inputs: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{k: [B, N, D]}``: raw output of blocks ``layers`` on the full clip, stopping at ``max(layers)``."""
        ks = check_layers(layers, self.num_layers)
        x = self.embed(inputs)
        out = {}
        for i, blk in enumerate(self.backbone.blocks[: ks[-1]]):
            x = blk(x)
            if i + 1 in ks:
                out[i + 1] = x
        return out


class LayerLockVideoMAE(BaseModel):
    """VideoMAE-style pretraining with LayerLock targets (see the module docstring).

    Args:
        backbone: config (or module) of mmaction2's ``VisionTransformer``.
        decoder: ``embed_dims``, ``depth``, ``num_heads``, ``mlp_ratio`` of the VideoMAE decoder.
        mask: ``type`` (``'tube'`` | ``'random'``) and ``ratio`` in (0, 1).
        seed: base seed of the per-step mask generator.
        data_preprocessor: defaults to ``ActionDataPreprocessor(format_shape='NCTHW')`` with ImageNet
            mean/std; its output ``[B, segs, C, T, H, W]`` is flattened to ``[B*segs, C, T, H, W]``.
    """

    def __init__(
        self,
        backbone: dict | nn.Module,
        decoder: dict | None = None,
        mask: dict | None = None,
        seed: int = 0,
        data_preprocessor: dict | nn.Module | None = None,
        init_cfg: dict | None = None,
    ):
        decoder = _checked_keys("model.decoder", decoder, _DECODER_DEFAULTS)
        mask = _checked_keys("model.mask", mask, _MASK_DEFAULTS)
        if mask["type"] not in ("tube", "random"):
            raise ConfigError("model.mask.type", f"must be 'tube' or 'random', got {mask['type']!r}")
        ratio = mask["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError("model.mask.ratio", f"must be a number in (0, 1), got {ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError("model.seed", f"must be an integer, got {seed!r}")
        for key in ("embed_dims", "depth", "num_heads"):
            if isinstance(decoder[key], bool) or not isinstance(decoder[key], int) or decoder[key] < 1:
                raise ConfigError(f"model.decoder.{key}", f"must be a positive integer, got {decoder[key]!r}")
        preprocessor = build_in_mmaction_scope(data_preprocessor or dict(_DEFAULT_PREPROCESSOR))
        super().__init__(data_preprocessor=preprocessor, init_cfg=init_cfg)
        if isinstance(backbone, dict) and "type" not in backbone:
            raise ConfigError("model.backbone.type", "missing; use type='VisionTransformer' (mmaction2's ViT)")
        try:
            self.backbone = build_in_mmaction_scope(backbone)
        except (KeyError, TypeError) as e:
            raise ConfigError("model.backbone", f"could not be built: {e}") from e
        self.encoder = MMActionViTEncoder(self.backbone)
        self.mask_type, self.mask_ratio, self.seed = mask["type"], float(ratio), seed

        dim, ddim = self.backbone.embed_dims, decoder["embed_dims"]
        num_tokens = self.backbone.pos_embed.shape[1]
        pt, ph, pw = self.encoder.tubelet
        in_ch = self.backbone.patch_embed.projection.in_channels
        self.encoder_to_decoder = nn.Linear(dim, ddim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.register_buffer("decoder_pos_embed", get_sinusoid_encoding(num_tokens, ddim), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(embed_dims=ddim, num_heads=decoder["num_heads"], mlp_ratio=decoder["mlp_ratio"], qkv_bias=True)
            for _ in range(decoder["depth"])
        )
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        heads = {PIXELS: nn.Linear(ddim, pt * ph * pw * in_ch)}
        heads.update({head_name(k): nn.Linear(ddim, dim) for k in range(1, self.encoder.num_layers)})
        self.readouts = nn.ModuleDict(heads)
        self._init_decoder()  # every head requires grad until the hook's before_train (module docstring)
        self.layerlock = None  # the controller, attached by LayerLockHook

    def _init_decoder(self) -> None:
        # VideoMAE's init of its decoder: xavier-uniform linears, unit layer norms, N(0, .02) mask token.
        for m in [self.encoder_to_decoder, *self.decoder_blocks, self.decoder_norm, *self.readouts.values()]:
            for sub in m.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    if sub.bias is not None:
                        nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # -- wiring with the hook ----------------------------------------------------------------------
    def attach_layerlock(self, controller: Any) -> None:
        """Called by :class:`LayerLockHook`; ``controller`` is a :class:`layerlock_plugin.controller.LayerLock`."""
        self.layerlock = controller

    def _controller(self):
        if self.layerlock is None:
            raise RuntimeError(
                "LayerLockVideoMAE needs LayerLockHook: add custom_hooks = [dict(type='LayerLockHook', ...)] "
                "to the config (the hook owns the freezing schedule and the targets)"
            )
        return self.layerlock

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, data_samples=None, mode: str = "tensor"):
        """``inputs [B, segs, C, T, H, W]`` (ActionDataPreprocessor, NCTHW) or ``[B, C, T, H, W]``.

        ``mode='loss'``: dict with ``loss`` and ``loss_<head>`` entries; ``mode='tensor'``: the backbone's
        output on the full clips. ``mode='predict'`` is refused: fine-tune with a recognizer instead.
        """
        video = inputs.flatten(0, 1) if inputs.dim() == 6 else inputs
        if mode == "loss":
            return self.loss(video)
        if mode == "tensor":
            return self.backbone(video)
        raise ValueError(
            f"LayerLockVideoMAE is a pretraining model and supports mode='loss' | 'tensor', not {mode!r}; "
            f"fine-tune its backbone with a Recognizer3D config (see layerlock_plugin.adapters.mmaction.convert)"
        )

    def _generator(self, step: int) -> torch.Generator:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        # One stream per (seed, step, rank): resume redraws the same masks, ranks draw different ones.
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 9_973 + rank) % (2**63 - 1))

    def masks(self, video: torch.Tensor, step: int, loss_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(visible [B, V], query [B, Q])`` sorted token indices for ``video [B, C, T, H, W]``."""
        grid = self.encoder.grid(video)
        gen = self._generator(step)
        b = video.shape[0]
        if self.mask_type == "tube":
            visible, masked = tube_masking(b, grid, self.mask_ratio, generator=gen, device=video.device)
        else:
            visible, masked = random_masking(b, grid[0] * grid[1] * grid[2], self.mask_ratio, generator=gen, device=video.device)
        return visible, subsample_indices(masked, loss_fraction, generator=gen)

    def student(self, video: torch.Tensor, visible: torch.Tensor, frozen_prefix: int) -> torch.Tensor:
        """Encoder on the visible tokens -> ``[B, V, D]``; the first ``frozen_prefix`` blocks (and the
        stem) run without autograd since they are frozen."""
        blocks = self.backbone.blocks
        with torch.no_grad() if frozen_prefix > 0 else contextlib.nullcontext():
            x = gather_tokens(self.encoder.embed(video), visible)
            for blk in blocks[:frozen_prefix]:
                x = blk(x)
        for blk in blocks[frozen_prefix:]:
            x = blk(x)
        x = self.backbone.norm(x)
        if self.backbone.fc_norm is not None:  # use_mean_pooling: train fc_norm as a per-token norm
            x = self.backbone.fc_norm(x)
        return x

    def decode(self, latent: torch.Tensor, visible: torch.Tensor, query: torch.Tensor, heads: Sequence[str]) -> dict[str, torch.Tensor]:
        """``latent [B, V, D]`` -> ``{head: [B, Q, P]}`` at the query positions."""
        x = self.encoder_to_decoder(latent)
        b, q = query.shape
        pos = self.decoder_pos_embed.to(x.dtype).expand(b, -1, -1)
        queries = self.mask_token.expand(b, q, -1) + gather_tokens(pos, query)
        z = torch.cat([x + gather_tokens(pos, visible), queries], dim=1)
        for blk in self.decoder_blocks:
            z = blk(z)
        z = self.decoder_norm(z[:, -q:])
        return {h: self.readouts[h](z) for h in heads}

    def loss(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        ll = self._controller()
        plan = ll.plan
        visible, query = self.masks(video, plan.step, ll.config.target.loss_fraction)
        targets = ll.targets(video, plan, query)
        preds = self.decode(self.student(video, visible, ll.frozen_prefix(plan)), visible, query, list(targets))
        loss, parts = ll.loss(preds, targets)
        # The collapse guard runs here, before backward: under policy 'skip' the hook's optimizer
        # pre-hook drops this step's gradients.
        ll.end_step(loss, targets)
        out = {"loss": loss}
        if len(parts) > 1:  # per-head values for the log; mmengine sums only keys containing 'loss'
            out.update({f"mse_{h}": v for h, v in parts.items()})
        return out


for _registry in (MODELS, ROOT_MODELS):
    _registry.register_module(module=LayerLockVideoMAE)
