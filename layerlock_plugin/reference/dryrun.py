"""``layerlock-train --config vit_g --dry-run``: what a run will cost, without allocating it.

Builds the model on the meta device (shapes only, no memory), counts parameters, lists the freeze
timeline of the schedule and estimates per phase the training FLOPs of one step and the memory per
device. The same cost model gives the trainer's MFU (:mod:`.train.throughput`).

Cost model (matrix-multiply FLOPs, 2 per multiply-add; norms, softmax and RoPE are left out): a block
over ``n`` tokens costs ``2n(4D^2 + 2D*M) + 4n^2*D`` forward (``M`` = MLP width); backward costs twice
the forward (the stem's: once, the video needs no gradient). Per step the student runs the stem on all ``N`` tokens, the encoder on the ``V`` visible
tokens (frozen blocks forward only, under no_grad), the decoder blocks on ``V + Q`` tokens and the
readouts on ``Q`` query tokens; a latent target adds a no-grad forward of the stem and blocks
``1..k`` over all ``N`` tokens.

Memory per device (an estimate, labelled as one): fp32 weights, fp32 gradients and AdamW's two fp32
moments for trainable parameters (divided by the world size under FSDP), plus stored activations of
the trainable blocks: ``34*n*D`` bytes per block and sample in bf16 (``68*n*D`` in fp32; Korthikanti
et al. 2022, attention scores not stored thanks to SDPA), ``2*n*D`` (``4*n*D``) with activation
checkpointing. Frozen blocks store nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..masking import num_masked
from ..schedule import Plan, Schedule
from .model import ModelConfig, VideoMAE


@dataclass(frozen=True)
class Tokens:
    """Token counts of one sample: ``N`` all, ``V`` visible, ``Q`` queries (masked with a loss)."""

    n: int
    v: int
    q: int

    @classmethod
    def of(cls, cfg: ModelConfig, loss_fraction: float = 1.0) -> Tokens:
        t, h, w = cfg.grid
        n = t * h * w
        m = num_masked(n, cfg.mask_ratio)
        q = max(1, int(loss_fraction * m + 0.5)) if loss_fraction < 1.0 else m
        return cls(n, n - m, q)

    def target_context(self, context: str = "full") -> int:
        """Tokens the latent target pass runs on: all ``N`` (``"full"``) or ``Q + V`` (``"sparse"``)."""
        return self.n if context == "full" else self.q + self.v


def block_flops(cfg: ModelConfig, n: int) -> float:
    """Forward matmul FLOPs of one block over ``n`` tokens (one sample)."""
    d, hidden = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio)
    return 2 * n * (4 * d * d + 2 * d * hidden) + 4 * n * n * d


def step_flops(cfg: ModelConfig, num_frozen: int, target_layers: list[int], loss_fraction: float = 1.0,
               stem_frozen: bool | None = None, context: str = "full") -> dict[str, float]:
    """Training FLOPs of one step per sample: ``student`` (forward + backward), ``target`` (the latent
    target's no-grad forward over ``target.context`` tokens) and ``total``. ``target_layers`` empty =
    pixel target (free)."""
    tok = Tokens.of(cfg, loss_fraction)
    enc = cfg.depth - cfg.decoder_depth
    stem_frozen = num_frozen > 0 if stem_frozen is None else stem_frozen
    pt, ph, pw = cfg.tubelet
    stem = 2 * tok.n * cfg.embed_dim * cfg.in_chans * pt * ph * pw
    student = stem * (1 if stem_frozen else 2)  # its backward is the weight gradient only (no video grad)
    student += num_frozen * block_flops(cfg, tok.v) + 3 * (enc - num_frozen) * block_flops(cfg, tok.v)
    student += 3 * cfg.decoder_depth * block_flops(cfg, tok.v + tok.q)
    heads = target_layers or [0]
    for k in heads:
        out = cfg.embed_dim if k else cfg.in_chans * pt * ph * pw
        student += 3 * 2 * tok.q * cfg.embed_dim * out
    target = stem + max(target_layers) * block_flops(cfg, tok.target_context(context)) if target_layers else 0.0
    return {"student": float(student), "target": float(target), "total": float(student + target)}


def memory_bytes(cfg: ModelConfig, params: int, trainable: int, trainable_blocks: int, micro_batch: int,
                 world_size: int = 1, strategy: str = "none", bf16: bool = True, checkpointing: bool = False,
                 loss_fraction: float = 1.0) -> dict[str, float]:
    """Estimated bytes per device: weights, grads, optimizer state, activations (see module doc)."""
    shard = world_size if strategy == "fsdp" else 1
    tok = Tokens.of(cfg, loss_fraction)
    enc = cfg.depth - cfg.decoder_depth
    per_token = (2 if checkpointing else 34) * (1 if bf16 else 2) * cfg.embed_dim
    trainable_enc = max(0, trainable_blocks - cfg.decoder_depth)
    acts = micro_batch * per_token * (min(trainable_enc, enc) * tok.v + cfg.decoder_depth * (tok.v + tok.q))
    out = {"weights": 4 * params / shard, "grads": 4 * trainable / shard, "optimizer": 8 * trainable / shard,
           "activations": float(acts)}
    out["total"] = sum(out.values())
    return out


def build_meta(config: Any) -> VideoMAE:
    """The run's model on the meta device: real shapes and parameter count, no storage."""
    ll = config.layerlock()
    enc = config.model.depth - config.model.decoder_depth
    max_frozen = config.schedule.resolve_max_frozen(enc)
    latent = range(1, max_frozen + 1) if ll.target.kind == "latent" else ()
    with torch.device("meta"):
        return VideoMAE(config.model, latent_target_layers=latent)


def _fmt(x: float, unit: str = "") -> str:
    for scale, p in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {p}{unit}"
    return f"{x:.0f} {unit}"


def dry_run(config: Any, world_size: int = 1, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Print (through ``echo``) and return the run's size, freeze timeline and per-phase costs."""
    from ..controller import LayerLock

    from .parallel.distributed import check_batch

    cfg, m = config, config.model
    if world_size > 1 and cfg.train.strategy == "none":
        raise ConfigError("train.strategy", f"'none' runs one process; --world-size {world_size} needs 'ddp' or "
                                            "'fsdp' (e.g. --set train.strategy=fsdp)")
    micro = check_batch(cfg.train.batch_size, cfg.train.grad_accum, world_size)  # the same check as a real run
    model = build_meta(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    params = sum(p.numel() for p in model.parameters())
    enc = m.depth - m.decoder_depth
    ll = LayerLock(model, cfg.layerlock(), tubelet=m.tubelet)
    schedule: Schedule = ll.schedule
    adaptive = getattr(cfg.schedule, "kind", "explicit") == "adaptive"
    events = [(s, d) for s, d in zip(schedule.event_steps, schedule.depths)] if ll.config.freeze else []
    tok = Tokens.of(m, cfg.target.loss_fraction)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and cfg.train.device != "cpu")
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    stem_params = sum(p.numel() for p in model.patch_embed.parameters())
    readout = {name: sum(p.numel() for p in r.parameters()) for name, r in model.readouts.items()}
    mae = step_flops(m, 0, [], cfg.target.loss_fraction)["total"]

    header = [
        f"dry run: {cfg.method} on {m.depth} blocks (encoder {enc}, decoder {m.decoder_depth}), width "
        f"{m.embed_dim}, {m.num_frames}x{m.img_size}x{m.img_size} clips -> N={tok.n} tokens, V={tok.v} visible, "
        f"Q={tok.q} queries" + (f"; latent target pass over {tok.target_context(cfg.target.context)} tokens "
                                f"(target.context={cfg.target.context})" if ll.config.target.kind == "latent" else ""),
        f"parameters: {params:,} ({params / 1e9:.3f} B) built on the meta device (nothing allocated)",
        f"global batch {cfg.train.batch_size} = {world_size} processes x {cfg.train.grad_accum} micro-steps x "
        f"{micro} clips; strategy {cfg.train.strategy}; {'bf16' if bf16 else 'fp32'} activations"]
    if adaptive and ll.config.freeze:
        # when to freeze is decided during training; cost each depth the schedule may reach instead
        max_frozen = cfg.schedule.resolve_max_frozen(enc)
        header.append(f"freeze timeline: decided during training (adaptive schedule, up to {max_frozen} blocks); "
                      f"one row per frozen depth it may reach")
        events = [(cfg.train.steps + d, d) for d in range(1, max_frozen + 1)]
    elif events:
        header.append(f"freeze timeline: pixel target for steps 0..{events[0][0] - 1}; first freeze at step "
                      f"{events[0][0]}; {events[-1][1]} blocks frozen at step {events[-1][0]} ({len(events)} events)")
    else:
        header.append("freeze timeline: no freezing (method " + cfg.method + ")")

    # phases: the pixel phase, then one per event (same cost until the next one)
    starts = [0] + [s for s, _ in events]
    phases = []
    for i, start in enumerate(starts):
        stop = min(starts[i + 1] if i + 1 < len(starts) else cfg.train.steps, cfg.train.steps)
        if start >= cfg.train.steps and not adaptive:
            break
        plan = ll.plan_at(start) if not (adaptive and i) else Plan(
            step=start, num_frozen=events[i - 1][1], target_layer=events[i - 1][1], stage=i, steps_since_switch=0,
            stem_frozen=cfg.schedule.freeze_stem, is_switch=True)
        layers = ll.target_layers(plan)
        fl = step_flops(m, plan.num_frozen, layers, cfg.target.loss_fraction, plan.stem_frozen, cfg.target.context)
        trainable = params - plan.num_frozen * block_params - (stem_params if plan.stem_frozen else 0)
        trainable -= sum(n for h, n in readout.items() if h not in ll.heads(plan))
        mem = memory_bytes(m, params, trainable, m.depth - plan.num_frozen, micro, world_size, cfg.train.strategy,
                           bf16, cfg.train.activation_checkpointing, cfg.target.loss_fraction)
        phases.append({"steps": [start, stop], "num_frozen": plan.num_frozen, "target": ll.heads(plan),
                       "flops_per_clip": fl, "flops_per_step": fl["total"] * cfg.train.batch_size,
                       "vs_mae_step": fl["total"] / mae, "student_vs_mae": fl["student"] / mae,
                       "memory_per_device": mem})
    span = lambda p: max(0, p["steps"][1] - p["steps"][0])  # noqa: E731
    total = sum(span(p) * p["flops_per_step"] for p in phases)
    student = sum(span(p) * p["flops_per_clip"]["student"] * cfg.train.batch_size for p in phases)
    mae_total = mae * cfg.train.batch_size * cfg.train.steps

    # what the user pays, first: the whole run against the same run as MAE (and against MAE's usual
    # every-masked-patch loss when the config queries a subset)
    if adaptive:
        echo("cost: decided during training (adaptive schedule): the per-depth step costs against MAE are below")
    else:
        echo(f"cost: the whole run is {total / mae_total:.3f}x the FLOPs of the same run as MAE (--method mae): "
             f"the student {student / mae_total:.3f}x (freezing saves {1 - student / mae_total:.1%}), the latent "
             f"targets {(total - student) / mae_total:+.1%}")
        if cfg.target.loss_fraction < 1.0:
            every = step_flops(m, 0, [], 1.0)["total"] * cfg.train.batch_size * cfg.train.steps
            echo(f"      and {total / every:.3f}x an MAE run with a loss on every masked patch (this config queries "
                 f"target.loss_fraction={cfg.target.loss_fraction:g} of them, target.context={cfg.target.context})")
    for line in header:
        echo(line)
    echo(f"{'steps':>21} {'frozen':>6} {'target':>9} {'step FLOPs':>12} {'vs MAE':>7} {'student':>8} "
         f"{'mem/device':>11} (weights+grads+optim+activations, estimate)")
    for ph in phases:
        a, b = ph["steps"]
        mem = ph["memory_per_device"]
        label = f"{a}..{b - 1}" if b > a else "when decided"
        echo(f"{label:>21} {ph['num_frozen']:>6} {','.join(ph['target']):>9} "
             f"{_fmt(ph['flops_per_step'], 'F'):>12} {ph['vs_mae_step']:>7.3f} {ph['student_vs_mae']:>8.3f} "
             f"{_fmt(mem['total'], 'B'):>11} ({_fmt(mem['weights'], 'B')}+{_fmt(mem['grads'], 'B')}+"
             f"{_fmt(mem['optimizer'], 'B')}+{_fmt(mem['activations'], 'B')})")
    if adaptive:
        return {"params": params, "events": [], "phases": phases, "world_size": world_size}
    echo(f"whole run ({cfg.train.steps} steps): {_fmt(total, 'FLOPs')}; the student alone is {student / mae_total:.3f} "
         f"of the MAE baseline's FLOPs (freezing saves {1 - student / mae_total:.1%}), targets add "
         f"{(total - student) / mae_total:.1%}")
    return {"params": params, "events": events, "phases": phases, "total_flops": total,
            "student_vs_mae": student / mae_total, "world_size": world_size}


__all__ = ["dry_run", "build_meta", "step_flops", "block_flops", "memory_bytes", "Tokens"]
