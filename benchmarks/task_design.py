"""Prototype of the evidence suite's probe tasks (stage 1 of the evidence study): renderer options and a
supervised screen.

The packaged moving-digits clips (``layerlock_plugin.reference.data``) wrap the digit around the frame edges,
so in most frames the digit is cut in two pieces at opposite edges; a ViT with (non-toroidal) position
encoding then has to learn digit identity from fragments, and in the earlier studies it never did. This
prototype renders the same clips with three options on top of the packaged renderer:

* ``placement``: ``'wrap'`` (packaged) or ``'inside'``: the digit's trajectory stays inside the frame; the
  position at the clip's middle frame is drawn from one box (the same for every class) that leaves room for
  any trajectory of the config, so no single frame's position distribution depends on a label through the
  box;
* ``turn``: at the middle frame the velocity turns by ``+turn`` (counter-clockwise, label 0) or ``-turn``
  (clockwise, label 1) degrees: the ``turn`` label, a temporal task that needs the motion before and after
  the turn set in relation (the sign of their cross product), which no average of per-token motion can give;
* ``digit_value``: the digit's colour keeps its hue but its brightness (HSV value) is drawn from this range
  (packaged: 1.0), and ``background_value`` the background albedo's (packaged: 0.5-0.9).

    python benchmarks/task_design.py supervised --task appearance --set placement=inside --steps 800

The screen trains the packaged supervised encoder (``SupervisedEncoder``: the model's encoder, mean-pooled
tokens, LayerNorm, linear) on fresh clips and reports its own held-out accuracy (test digit images).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import provenance, write_json  # noqa: E402

from layerlock_plugin.reference.data import digits as D  # noqa: E402
from layerlock_plugin.reference.data import DigitsVideoConfig as _DVC  # noqa: E402
from layerlock_plugin.reference.eval.calibration import SupervisedEncoder  # noqa: E402
from layerlock_plugin.reference.model import ModelConfig  # noqa: E402
from layerlock_plugin.reference.train.optim import cosine_with_warmup, param_groups  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Design:
    placement: str = "wrap"
    turn: float = 0.0
    digit_value: tuple[float, float] = (1.0, 1.0)
    background_value: tuple[float, float] = (0.5, 0.9)
    digit_saturation: tuple[float, float] | None = None  # None: the packaged tint (0.6-1.0)


class DesignDigits(D.DigitsVideoDataset):
    """:class:`DigitsVideoDataset` with the options of :class:`Design` (see the module docstring)."""

    def __init__(self, config: _DVC, split: str, design: Design, cache: bool = False):
        self.design = design
        super().__init__(config, split, cache=cache)
        if design.turn:
            self.num_classes = {**self.num_classes, "turn": 2}

    def sample_params(self, index: int) -> dict[str, Any]:
        p = super().sample_params(index)
        cfg, dz = self.config, self.design
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self._split_id, index, 1]))
        turn = int(rng.integers(2))
        vx, vy = p["velocity"]
        a = math.radians(dz.turn) * (1 if turn == 0 else -1)
        # screen rotation by +a (counter-clockwise on screen, y down): (vx, vy) -> (vx c + vy s, -vx s + vy c)
        c, s = math.cos(a), math.sin(a)
        p["velocity_after"] = (vx * c + vy * s, -vx * s + vy * c)
        p["turn"] = turn
        if dz.placement == "inside":
            reach = max(cfg.speeds) * cfg.num_frames / 2
            half = p["digit_size"] / 2
            lo, hi = half + reach, cfg.size - half - reach
            p["middle"] = tuple(float(x) for x in rng.uniform(lo, hi, size=2)) if hi > lo else (cfg.size / 2,) * 2
        hsv_v = float(rng.uniform(*dz.digit_value))
        bg_v = float(rng.uniform(*dz.background_value))
        hue = float(rng.uniform())
        if dz.digit_saturation is not None:
            p["digit_color"] = D._hsv_to_rgb(hue, float(rng.uniform(*dz.digit_saturation)), 1.0)
        p["digit_color"] = p["digit_color"] * hsv_v
        base = p["background_albedo"]
        p["background_albedo"] = base / max(float(base.max()), 1e-6) * bg_v
        return p

    def _centres(self, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        T = self.config.num_frames
        tm = T // 2
        t = np.arange(T, dtype=np.float64)
        v1, v2 = np.array(p["velocity"]), np.array(p["velocity_after"])
        rel = np.where((t < tm)[:, None], (t - tm)[:, None] * v1, (t - tm)[:, None] * v2)  # [T, 2]
        if self.design.placement == "inside":
            mid = np.array(p["middle"])
        else:
            mid = np.array(p["start"]) + tm * v1
        pos = mid + rel
        return pos[:, 0], pos[:, 1]

    def render(self, index: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        p = self.sample_params(index)
        T, S = cfg.num_frames, cfg.size
        coords = (np.arange(S, dtype=np.float32) + 0.5) / S * 2.0 - 1.0
        xn, yn = coords[None, :], coords[:, None]
        ca, sa = math.cos(p["ramp_angle"]), math.sin(p["ramp_angle"])
        r = ca * xn + sa * yn
        r = (r - r.min()) / max(float(r.max() - r.min()), 1e-6)
        near, far = p["background_depth"]
        zb = (near + (far - near) * r).astype(np.float32)
        freq, tang, ph0, ph1 = p["texture"]
        X, Y = xn * zb, yn * zb
        ct, st = math.cos(tang), math.sin(tang)
        tex = 0.5 + 0.5 * np.sin(freq * (ct * X + st * Y) + ph0) * np.sin(freq * (-st * X + ct * Y) + ph1)
        lo = cfg.depth_range[0]
        bg = p["background_albedo"][:, None, None] * ((1.0 - cfg.texture + cfg.texture * tex) * np.exp(-(zb - lo) / cfg.fog))
        cx, cy = self._centres(p)
        my = D._sampling_matrix(cy, p["digit_size"], S)
        mx = D._sampling_matrix(cx, p["digit_size"], S)
        img = self._images[p["digit_index"]]
        alpha = np.clip(np.matmul(np.matmul(my, img), mx.transpose(0, 2, 1)), 0.0, 1.0)
        fg = p["digit_color"] * math.exp(-(p["digit_depth"] - lo) / cfg.fog)
        a = alpha[None]
        video = (1.0 - a) * bg[:, None] + a * fg[:, None, None, None]
        if cfg.noise > 0:
            video = video + cfg.noise * np.random.default_rng(p["noise_seed"]).standard_normal(video.shape, dtype=np.float32)
        video = np.clip(video, 0.0, 1.0).astype(np.float32, copy=False)
        if cfg.standardize:
            mean, std = self._stats()
            video = (video - mean[:, None, None, None]) / std[:, None, None, None]
        depth = np.where(alpha >= 0.5, np.float32(p["digit_depth"]), zb[None]).astype(np.float32)
        out = {"video": torch.from_numpy(np.ascontiguousarray(video)),
               "motion": torch.tensor(p["motion"], dtype=torch.long),
               "appearance": torch.tensor(p["appearance"], dtype=torch.long),
               "depth": torch.from_numpy(np.ascontiguousarray(depth))}
        if self.design.turn:
            out["turn"] = torch.tensor(p["turn"], dtype=torch.long)
        return out

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_stats_cache"):
            raw = DesignDigits(dataclasses.replace(self.config, standardize=False), "train", self.design)
            video = np.stack([raw.render(i)["video"].numpy() for i in range(min(256, len(raw)))])
            mean = video.mean(axis=(0, 2, 3, 4), dtype=np.float64).astype(np.float32)
            std = np.maximum(video.std(axis=(0, 2, 3, 4), dtype=np.float64), 1e-6).astype(np.float32)
            self._stats_cache = (mean, std)
        return self._stats_cache


def parse_sets(sets: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``key=value`` -> (design fields, data fields ``data.x``, model fields ``model.x``)."""
    import yaml

    design, data, model = {}, {}, {}
    for s in sets:
        k, v = s.split("=", 1)
        val = yaml.safe_load(v)
        if isinstance(val, list):
            val = tuple(val)
        if k.startswith("data."):
            data[k[5:]] = val
        elif k.startswith("model."):
            model[k[6:]] = val
        else:
            design[k] = val
    return design, data, model


def build(sets: list[str], num_videos: int, num_test: int) -> tuple[DesignDigits, DesignDigits, ModelConfig]:
    design, data, model = parse_sets(sets)
    dcfg = _DVC(**{"num_videos": num_videos, "num_test_videos": num_test, "standardize": True, **data})
    dz = Design(**design)
    mcfg = ModelConfig.tiny(**{"mask_ratio": 0.75, **model})
    return DesignDigits(dcfg, "train", dz), DesignDigits(dcfg, "test", dz), mcfg


class AttentivePoolEncoder(nn.Module):
    """The model's encoder with an attentive pooling head (one learned query, multi-head cross-attention
    over the output tokens, LayerNorm, linear): ``video -> logits [B, K]``."""

    def __init__(self, cfg: ModelConfig, num_classes: int, heads: int = 4):
        super().__init__()
        from layerlock_plugin.reference.model import VideoMAE

        self.backbone = VideoMAE(cfg)
        d = cfg.embed_dim
        self.query = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pool = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.encode(video)
        pooled, _ = self.pool(self.query.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
        return self.head(self.norm(pooled[:, 0]))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(video)


class MultiTaskEncoder(nn.Module):
    """The model's encoder trained on every label of the suite at once: per classification task a
    ``LayerNorm -> Linear`` head on the mean-pooled tokens, and a per-token ``Linear(D, 1)`` depth head
    (the mean depth of each token's tubelet, standardised). ``forward(video) -> {task: logits, 'depth': [B, N]}``."""

    def __init__(self, cfg: ModelConfig, num_classes: dict[str, int], depth: bool = True):
        super().__init__()
        from layerlock_plugin.reference.model import VideoMAE

        self.backbone = VideoMAE(cfg)
        d = cfg.embed_dim
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, k)) for t, k in num_classes.items()})
        self.depth = nn.Linear(d, 1) if depth else None

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.backbone.encode(video)
        pooled = tokens.mean(dim=1)
        out = {t: h(pooled) for t, h in self.heads.items()}
        if self.depth is not None:
            out["depth"] = self.depth(tokens).squeeze(-1)
        return out

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(video)


def stack(ds, idx, task):
    items = [ds[int(i)] for i in idx]
    return torch.stack([it["video"] for it in items]), torch.stack([it[task] for it in items])


@torch.no_grad()
def own_accuracy(model, ds, n, task):
    model.eval()
    correct = 0
    for chunk in torch.arange(min(n, len(ds))).split(128):
        v, y = stack(ds, chunk, task)
        correct += int((model(v).argmax(1) == y).sum())
    model.train()
    return correct / min(n, len(ds))


def stack_all(ds, idx, tasks, tubelet):
    from layerlock_plugin.reference.eval import token_depth_targets

    items = [ds[int(i)] for i in idx]
    out = {t: torch.stack([it[t] for it in items]) for t in tasks}
    out["video"] = torch.stack([it["video"] for it in items])
    out["depth"] = token_depth_targets(torch.stack([it["depth"] for it in items]), tubelet)
    return out


@torch.no_grad()
def multi_accuracy(model, ds, n, tasks, tubelet):
    model.eval()
    correct = {t: 0 for t in tasks}
    sse = sst = 0.0
    for chunk in torch.arange(min(n, len(ds))).split(128):
        b = stack_all(ds, chunk, tasks, tubelet)
        out = model(b["video"])
        for t in tasks:
            correct[t] += int((out[t].argmax(1) == b[t]).sum())
    model.train()
    return {t: c / min(n, len(ds)) for t, c in correct.items()}


def multitask(args) -> int:
    torch.set_num_threads(args.threads)
    train, test, mcfg = build(args.sets, args.steps * args.batch_size, 512)
    tasks = [t for t in args.tasks.split(",")]
    torch.manual_seed(args.seed)
    model = MultiTaskEncoder(mcfg, {t: train.num_classes[t] for t in tasks}, depth=args.depth)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(args.steps, max(1, args.steps // 15), 0.1))
    dmean, dstd = 6.0, 2.5
    started, losses, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        b = stack_all(train, torch.arange(step * args.batch_size, (step + 1) * args.batch_size), tasks, mcfg.tubelet)
        out = model(b["video"])
        loss = sum(F.cross_entropy(out[t], b[t]) for t in tasks)
        if args.depth:
            loss = loss + F.mse_loss(out["depth"], (b["depth"] - dmean) / dstd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 4) == 0:
            row = {"step": step + 1, "loss": float(np.mean(losses[-50:])),
                   **multi_accuracy(model, test, 512, tasks, mcfg.tubelet), "s": round(time.perf_counter() - started)}
            curve.append(row)
            print(row, flush=True)
            if args.out:
                torch.save(model.state_dict(), Path(args.out).with_suffix(f".step{step + 1}.pt"))
    if args.out:
        write_json(Path(args.out), {"provenance": provenance(), "sets": args.sets, "tasks": tasks, "lr": args.lr,
                                    "steps": args.steps, "curve": curve})
        torch.save(model.state_dict(), Path(args.out).with_suffix(".pt"))
    return 0


def calib(args) -> int:
    """Probe the cheap rungs (raw pixels, motion features, random init; a saved multitask model) on every task."""
    import json

    from evidence_probes import probe_suite
    from layerlock_plugin.reference.eval.calibration import motion_tokens, pixel_tokens
    from layerlock_plugin.reference.model import VideoMAE
    from layerlock_plugin.reference.eval import ProbeConfig, extract_features

    torch.set_num_threads(args.threads)
    train, test, mcfg = build(args.sets, 4096, 512)
    tasks = [t for t in ("motion", "appearance", "turn") if t in train.num_classes]
    cfg = ProbeConfig()
    rows = {}
    rungs = {"raw pixels": pixel_tokens(mcfg.tubelet), "motion features": motion_tokens(mcfg.tubelet)}
    for s in args.seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            rungs[f"random init {s}"] = VideoMAE(mcfg).eval().encode
    for path in args.models:
        m = MultiTaskEncoder(mcfg, {t: train.num_classes[t] for t in tasks}, depth=True)
        m.load_state_dict(torch.load(path, weights_only=True))
        rungs[f"supervised {Path(path).stem}"] = m.eval().encode
    for name, enc in rungs.items():
        t0 = time.perf_counter()
        tr = extract_features(enc, train, 512, 64, tubelet=mcfg.tubelet)
        te = extract_features(enc, test, 512, 64, tubelet=mcfg.tubelet)
        rows[name] = probe_suite(tr, te, mcfg.grid, cfg, train.num_classes, tasks)
        print(name, {k: round(v, 3) for k, v in rows[name].items() if k.endswith(("_acc", "_r2"))},
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        write_json(Path(args.out), {"provenance": provenance(), "sets": args.sets, "rows": rows})
    return 0


def supervised(args) -> int:
    torch.set_num_threads(args.threads)
    train, test, mcfg = build(args.sets, args.steps * args.batch_size, 512)
    k = train.num_classes[args.task]
    torch.manual_seed(args.seed)
    model = SupervisedEncoder(mcfg, k) if args.head == "mean" else AttentivePoolEncoder(mcfg, k)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(args.steps, max(1, args.steps // 15), 0.1))
    started, losses, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        idx = torch.arange(step * args.batch_size, (step + 1) * args.batch_size)  # fresh clips every step
        v, y = stack(train, idx, args.task)
        loss = F.cross_entropy(model(v), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 4) == 0:
            row = {"step": step + 1, "loss": float(np.mean(losses[-50:])),
                   "test_acc": own_accuracy(model, test, 512, args.task), "s": round(time.perf_counter() - started)}
            curve.append(row)
            print(row, flush=True)
    out = {"provenance": provenance(), "sets": args.sets, "task": args.task, "lr": args.lr, "steps": args.steps,
           "curve": curve}
    if args.out:
        write_json(Path(args.out), out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("supervised")
    s.add_argument("--task", default="appearance")
    s.add_argument("--steps", type=int, default=800)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=6e-4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--set", dest="sets", action="append", default=[])
    s.add_argument("--out", default="")
    s.add_argument("--head", default="mean", choices=("mean", "attentive"))
    m = sub.add_parser("multitask")
    m.add_argument("--tasks", default="appearance,motion,turn")
    m.add_argument("--depth", action="store_true")
    for a, kw in (("--steps", dict(type=int, default=800)), ("--batch-size", dict(type=int, default=32)),
                  ("--lr", dict(type=float, default=6e-4)), ("--seed", dict(type=int, default=0)),
                  ("--threads", dict(type=int, default=1)), ("--out", dict(default=""))):
        m.add_argument(a, **kw)
    m.add_argument("--set", dest="sets", action="append", default=[])
    c = sub.add_parser("calib")
    c.add_argument("--seeds", type=int, nargs="*", default=[0])
    c.add_argument("--models", nargs="*", default=[])
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default="")
    c.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    return {"supervised": supervised, "multitask": multitask, "calib": calib}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
