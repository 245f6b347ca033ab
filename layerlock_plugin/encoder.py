"""The layered-encoder protocol: what LayerLock needs to know about a host encoder.

LayerLock freezes an encoder from the input side, one *unit* at a time: the stem (patch embedding and
any learned positional/prefix tokens) and then the transformer blocks in depth order. It also needs a
*truncated forward*: the output ``h_k`` of block ``k`` on the full, unmasked input, computed without
running any deeper block.

An encoder takes part by implementing two methods (the reference model does; timm ViTs get a
wrapper in ``layerlock_plugin.adapters.timm_vit``):

``layerlock_units() -> EncoderUnits``
    the stem and the *freezable* blocks, in depth order. Blocks that a decoder reuses are not listed,
    so they can never be frozen.
``forward_prefix(inputs, layers) -> dict[int, Tensor]``
    for every ``k`` in ``layers`` (1-based block indices, ``1 <= k <= len(blocks)``), the patch-token
    output of block ``k`` as a ``[B, N, D]`` tensor on the full input (prefix tokens such as CLS are
    dropped). Must stop after block ``max(layers)``.

Optional: ``forward_prefix(inputs, layers, token_idx=idx)`` with ``idx [B, K]`` token positions runs the
blocks on those tokens only (each keeps its position) and returns ``{k: [B, K, D]}`` in ``idx`` order.
Encoders that accept it can use the cheaper ``target.context: sparse``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .errors import EncoderStructureError


def block_name(k: int) -> str:
    """The name of freezable block ``k`` (1-based) in events and logs: ``"block_k"``, beside the heads' ``"layer_k"``."""
    return f"block_{k}"


@dataclass(frozen=True)
class FreezeUnit:
    """One thing that freezes at once: some modules plus loose parameters (e.g. a ``pos_embed``).

    ``modules`` are put in eval mode when frozen (dropout / drop-path off); ``params`` are every
    parameter that stops training: those of ``modules`` plus ``extra_params``.
    """

    name: str
    modules: tuple[nn.Module, ...]
    extra_params: tuple[nn.Parameter, ...] = field(default=())

    @property
    def params(self) -> tuple[nn.Parameter, ...]:
        """Every parameter of the unit, each once, in module order then ``extra_params``."""
        seen: dict[int, nn.Parameter] = {}
        for m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        for p in self.extra_params:
            seen.setdefault(id(p), p)
        return tuple(seen.values())


@dataclass(frozen=True)
class EncoderUnits:
    """The stem and the freezable blocks of an encoder, in depth order (named ``"stem"`` and
    :func:`block_name`, by convention)."""

    stem: FreezeUnit
    blocks: tuple[FreezeUnit, ...]

    @property
    def num_layers(self) -> int:
        """Number of freezable blocks."""
        return len(self.blocks)


@runtime_checkable
class LayeredEncoder(Protocol):
    """The protocol (module docstring): ``layerlock_units()`` and ``forward_prefix(inputs, layers) -> {k: [B, N, D]}``."""

    def layerlock_units(self) -> EncoderUnits:
        """The stem and the freezable blocks, in depth order."""
        ...

    def forward_prefix(self, inputs: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{k: [B, N, D]}`` for each block ``k`` in ``layers`` on the full ``inputs``; stops at ``max(layers)``."""
        ...


def as_layered_encoder(model: object) -> LayeredEncoder:
    """Return ``model`` if it implements the protocol, else raise a clear error saying what to do."""
    if isinstance(model, LayeredEncoder):
        units = model.layerlock_units()
        if not isinstance(units, EncoderUnits) or units.num_layers == 0:
            raise EncoderStructureError(
                f"{type(model).__name__}.layerlock_units() must return EncoderUnits with at least one "
                f"freezable block, got {units!r}"
            )
        return model
    module = getattr(type(model), "__module__", "")
    hint = ""
    if module.startswith("timm."):
        hint = " Wrap it: layerlock_plugin.adapters.timm_vit.TimmViTEncoder(model)."
    raise EncoderStructureError(
        f"{type(model).__name__} does not implement the LayerLock layered-encoder protocol "
        f"(methods layerlock_units() and forward_prefix()); LayerLock cannot find its patch embedding "
        f"and ordered blocks.{hint}"
    )


def accepts_token_idx(encoder: LayeredEncoder) -> bool:
    """Whether ``encoder.forward_prefix`` takes the optional ``token_idx`` keyword (sparse target context)."""
    try:
        return "token_idx" in inspect.signature(encoder.forward_prefix).parameters
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return False


def check_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """Validate 1-based block indices for ``forward_prefix``; returns them sorted and unique."""
    out = sorted(set(int(k) for k in layers))
    if not out:
        raise ValueError("forward_prefix: layers must not be empty")
    if out[0] < 1 or out[-1] > num_layers:
        raise ValueError(
            f"forward_prefix: layers must be in 1..{num_layers} (the freezable blocks), got {out}"
        )
    return out
