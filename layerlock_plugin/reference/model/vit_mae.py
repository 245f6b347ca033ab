"""The reference video ViT masked autoencoder (4DS style) that LayerLock pretrains.

One stack of ``depth`` pre-norm transformer blocks serves as both encoder and decoder (as in 4DS and
the LayerLock paper): ``blocks[:encoder_depth]`` encode the visible tokens; learned query tokens for
the positions to predict are then concatenated to them and the last ``decoder_depth`` blocks decode.
Position comes from 3D RoPE (after ``norm1`` by default) and/or an additive embedding. A per-patch
linear readout per target (``"pixels"``, ``"layer_k"``) maps the decoded queries to predictions.

Shapes: ``B`` batch, ``C`` channels, ``T x H x W`` video, ``N`` patch tokens in ``(t h w)`` order,
``V`` visible and ``Q`` query tokens, ``D`` width.

The model implements the layered-encoder protocol (:mod:`layerlock_plugin.encoder`):
``layerlock_units()`` lists the stem and the encoder blocks (never the decoder-reused ones) and
``forward_prefix()`` runs the full, unmasked input (or the tokens at ``token_idx``, for a sparse target
context) through blocks ``1..k`` only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import einops
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ...encoder import EncoderUnits, FreezeUnit, block_name, check_layers
from ...errors import ConfigError
from ...targets import head_name, patchify
from .config import ModelConfig
from .rope import RoPE3D, apply_rope, sincos_pos_embed_3d

__all__ = ["VideoMAE", "Block", "Attention"]

RopeEmb = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; optional RoPE on q and k.

    ``x [B, n, D]`` -> ``[B, n, D]``. ``rope`` (``(sin, cos)`` for these tokens, head-sized) rotates q and k
    per head when given.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: RopeEmb | None = None) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(einops.rearrange(x, "b h n d -> b n (h d)")))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(rope(norm1(x))))``, then ``x + dp(mlp(norm2(x)))``.

    ``forward(x [B, n, D], rope)`` where ``rope`` is the ``(sin, cos)`` pair already gathered for these
    ``n`` tokens' positions (see :meth:`VideoMAE.rope_emb`), or None. With ``rope_after_norm`` it rotates
    the normalised token (4DS); otherwise it is handed to attention, which rotates q and k per head.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        rope_after_norm: bool = True,
    ):
        from timm.layers import DropPath, Mlp  # imported on use: the CLI's config checks start without timm

        super().__init__()
        self.rope_after_norm = rope_after_norm
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.grad_checkpointing = False  # see VideoMAE.set_grad_checkpointing

    def forward(self, x: torch.Tensor, rope: RopeEmb | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Store only the block input; recompute the inside in backward. Blocks that run without
            # autograd (LayerLock's frozen prefix) store nothing and skip this.
            return torch.utils.checkpoint.checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)

    def _forward(self, x: torch.Tensor, rope: RopeEmb | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if rope is not None and self.rope_after_norm:
            h, rope = apply_rope(h, rope), None
        x = x + self.drop_path1(self.attn(h, rope))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VideoMAE(nn.Module):
    """4DS-style video ViT MAE with a shared encoder/decoder block stack.

    Args:
        cfg: the architecture.
        latent_target_layers: encoder blocks ``k`` (``1..encoder_depth-1``) that get a ``"layer_k"``
            readout (``D -> D``) for LayerLock's latent targets; ``"pixels"`` (``D -> pt*ph*pw*C``) is
            always there.
    """

    def __init__(self, cfg: ModelConfig, latent_target_layers: Sequence[int] = ()):
        super().__init__()
        self.cfg = cfg
        d, (pt, ph, pw) = cfg.embed_dim, cfg.tubelet
        self.encoder_depth = cfg.depth - cfg.decoder_depth
        # timm has no 3D patch embed; a Conv3d with kernel = stride = tubelet is exactly one.
        self.patch_embed = nn.Conv3d(cfg.in_chans, d, kernel_size=cfg.tubelet, stride=cfg.tubelet)
        n = self.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed: torch.Tensor | None = nn.Parameter(torch.zeros(1, n, d))
        elif cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed_3d(self.grid, d), persistent=False)
        else:
            self.pos_embed = None
        self.rope = None if cfg.rope == "none" else RoPE3D(cfg.rope_dim, self.grid, cfg.rope_split, cfg.rope_theta)
        # stochastic depth grows with depth (explicitly on the CPU: the model may be built on the meta device)
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_drop, dpr[i], cfg.rope == "after_norm")
            for i in range(cfg.depth)
        )
        self.query_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        layers = sorted(set(int(k) for k in latent_target_layers))
        if layers and not (1 <= layers[0] and layers[-1] <= self.encoder_depth - 1):
            raise ConfigError(
                "latent_target_layers",
                f"must be encoder blocks in 1..{self.encoder_depth - 1} (encoder_depth - 1), got {layers}",
            )
        self.readouts = nn.ModuleDict({head_name(0): nn.Linear(d, pt * ph * pw * cfg.in_chans)})
        for k in layers:
            self.readouts[head_name(k)] = nn.Linear(d, d)
        self.apply(self._init_weights)
        nn.init.normal_(self.query_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            from timm.layers import trunc_normal_

            trunc_normal_(self.pos_embed, std=0.02)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing for every block that runs with autograd (the trainable ones):
        their activations are recomputed in backward instead of stored."""
        for blk in self.blocks:
            blk.grad_checkpointing = bool(enabled)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            from timm.layers import trunc_normal_

            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- geometry
    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')``."""
        return self.cfg.grid

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> ``[B, N, pt*ph*pw*C]`` in the order the ``"pixels"`` readout predicts."""
        return patchify(video, self.cfg.tubelet)

    # ----------------------------------------------------------------------------------- LayerLock
    def layerlock_units(self) -> EncoderUnits:
        """The stem (patch embed + learned pos_embed) and the ``encoder_depth`` encoder blocks; the
        decoder-reused blocks are left out so that they can never be frozen."""
        extra = (self.pos_embed,) if isinstance(self.pos_embed, nn.Parameter) else ()
        return EncoderUnits(
            stem=FreezeUnit("stem", (self.patch_embed,), extra_params=extra),
            blocks=tuple(FreezeUnit(block_name(i + 1), (self.blocks[i],)) for i in range(self.encoder_depth)),
        )

    def forward_prefix(self, video: torch.Tensor, layers: Sequence[int],
                       token_idx: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``{k: [B, N, D]}``: the output of encoder block ``k`` on the full, unmasked ``video``, for each
        ``k`` in ``layers`` (``1..encoder_depth``). Runs blocks ``1..max(layers)`` only. Leaves grad
        mode and train/eval mode to the caller.

        ``token_idx [B, K]``: run the blocks on those tokens only (each at its own position, as the
        encoder runs on the visible ones) and return ``{k: [B, K, D]}`` in ``token_idx`` order."""
        wanted = check_layers(layers, self.encoder_depth)
        x = self.embed(video)
        if token_idx is not None:
            self._check_idx("token_idx", token_idx, video.shape[0])
            x = x.gather(1, token_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
        rope = self.rope_emb(token_idx)
        out: dict[int, torch.Tensor] = {}
        for i in range(wanted[-1]):
            x = self.blocks[i](x, rope)
            if i + 1 in wanted:
                out[i + 1] = x
        return out

    def encode(self, video: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Full-input features ``[B, N, D]`` after encoder block ``layer`` (default: the last one)."""
        layer = self.encoder_depth if layer is None else layer
        return self.forward_prefix(video, [layer])[layer]

    # ----------------------------------------------------------------------------------- forward
    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> patch tokens ``[B, N, D]`` (plus the additive position embedding)."""
        c = self.cfg
        expected = (c.in_chans, c.num_frames, c.img_size, c.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"video: expected [B, {', '.join(map(str, expected))}] (B, C, T, H, W), got {tuple(video.shape)}"
            )
        x = self.patch_embed(video).flatten(2).transpose(1, 2)  # [B, D, T', H', W'] -> [B, N, D], (t h w)
        return x if self.pos_embed is None else x + self.pos_embed

    def rope_emb(self, token_idx: torch.Tensor | None) -> RopeEmb | None:
        """RoPE ``(sin, cos)`` for tokens at ``token_idx [B, n]`` (None: all ``N``). Gathered once per
        forward and shared by the blocks, rather than re-gathered in each of them."""
        return None if self.rope is None else self.rope.embed(token_idx)

    def _check_idx(self, name: str, idx: torch.Tensor, batch: int) -> None:
        if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] == 0 or idx.dtype != torch.long:
            raise ValueError(
                f"{name}: must be a non-empty int64 [B={batch}, K] tensor, got {idx.dtype} {tuple(idx.shape)}"
            )
        # Reading the range on the host is free for CPU indices but a device sync for GPU ones: there an
        # out-of-range index is left to the device-side assert of the gather (the trainer's are in range by
        # construction), and nothing is read while compiling.
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_patches:
                raise ValueError(f"{name}: token positions must be in 0..{self.num_patches - 1}, got {lo}..{hi}")

    def forward(
        self,
        video: torch.Tensor,
        visible_idx: torch.Tensor,
        query_idx: torch.Tensor,
        heads: Sequence[str] = ("pixels",),
        frozen_prefix: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Masked prediction.

        Args:
            video: ``[B, C, T, H, W]``.
            visible_idx: ``[B, V]`` positions the encoder sees.
            query_idx: ``[B, Q]`` positions to predict (usually the masked ones, or a subset).
            heads: readouts to apply (``"pixels"``, ``"layer_k"``).
            frozen_prefix: ``k > 0`` runs the stem and blocks ``1..k`` under ``no_grad``, so autograd
                stores nothing for them and their parameters get no gradient (LayerLock's saving).

        Returns:
            ``{head: [B, Q, out_dim]}`` (``out_dim`` = ``pt*ph*pw*C`` for pixels, ``D`` for layers).
        """
        heads = tuple(heads)
        if not heads:
            raise ValueError("heads: must name at least one readout")
        missing = [h for h in heads if h not in self.readouts]
        if missing:
            raise KeyError(f"heads: unknown readout(s) {missing}; available: {list(self.readouts)}")
        k = frozen_prefix
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.encoder_depth:
            raise ValueError(f"frozen_prefix: must be an integer in 0..{self.encoder_depth}, got {frozen_prefix!r}")
        b = video.shape[0]
        self._check_idx("visible_idx", visible_idx, b)
        self._check_idx("query_idx", query_idx, b)

        with torch.no_grad() if k > 0 else contextlib.nullcontext():
            x = self.embed(video)
            x = x.gather(1, visible_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, V, D]
            rope = self.rope_emb(visible_idx)
            for blk in self.blocks[:k]:
                x = blk(x, rope)
        for blk in self.blocks[k : self.encoder_depth]:
            x = blk(x, rope)

        q = self.query_token.expand(b, query_idx.shape[1], -1)
        if self.pos_embed is not None:
            # Query tokens carry their position the same way patch tokens do; a frozen stem's learned
            # pos_embed must not receive gradient through them either.
            pe = self.pos_embed.detach() if k > 0 else self.pos_embed
            q = q + pe[0][query_idx]
        # The query token (and position table) are fp32 parameters: under autocast they would promote the
        # bf16 stream to fp32 for the whole decoder; cast them to the stream's dtype (fp32: no-op).
        x = torch.cat([x, q.to(x.dtype)], dim=1)  # [B, V + Q, D]
        rope = self.rope_emb(torch.cat([visible_idx, query_idx], dim=1))
        for blk in self.blocks[self.encoder_depth :]:
            x = blk(x, rope)
        x = self.decoder_norm(x[:, visible_idx.shape[1] :])  # [B, Q, D]
        return {h: self.readouts[h](x) for h in heads}
