"""The main job's time, this checkout against an earlier commit, side by side, and its numbers unchanged.

    python benchmarks/main_job_speed.py --baseline main~1 --runs 2      # whole main job, A B A B ...
    python benchmarks/main_job_speed.py --baseline main~1 --runs 2 --set train.steps=300 --no-probe   # quicker

The baseline commit is exported with ``git archive`` into a temporary folder and run from there (its package
first on ``PYTHONPATH``); both run ``python -m layerlock_plugin.reference.cli --out ... --overwrite`` with one
thread (``OMP_NUM_THREADS=1``, the default here: two processes of one thread share a 2-core machine fairly),
alternately, so drifting machine load hits both alike. Per run: wall seconds and CPU seconds (user + system
of the process, from ``wait4``); the ratios (this checkout / baseline) are taken pair by pair and their
median printed. The two runs' probe lines must be identical and their final weights bitwise equal: a speed-up
that changes the numbers is reported as such (exit code 1).

The random-init probe baseline is cached by this checkout (``reference/eval/baseline_cache.py``): the first
run of a config computes it, later ones read it. ``--cache warm`` (default) fills the cache once before the
timed runs, as for a user's second run; ``--cache off`` times first runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def export(ref: str, into: Path) -> Path:
    """The tree of commit ``ref`` in ``into/baseline-src``."""
    dest = into / "baseline-src"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    tar = into / "baseline.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest


def run_once(tree: Path | None, out: Path, extra: list[str], env: dict[str, str]) -> dict:
    """One main job; ``tree`` None: this checkout. Returns wall / cpu seconds and the printed probe line."""
    env = dict(env)
    if tree is not None:
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [sys.executable, "-m", "layerlock_plugin.reference.cli", "--out", str(out), "--overwrite", "--no-progress",
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}")
    probe = next((line for line in stdout.splitlines() if line.startswith("probes (")), None)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "probe_line": probe}


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="git ref of the code to compare against")
    p.add_argument("--runs", type=int, default=2, help="timed runs of each (alternating)")
    p.add_argument("--cache", choices=["warm", "off"], default="warm")
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS of both (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job_speed.json"))
    args, extra = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="main-job-speed-") as tmp:
        tmp = Path(tmp)
        baseline = export(args.baseline, tmp)
        env = {**os.environ, "OMP_NUM_THREADS": args.threads,
               "LAYERLOCK_CACHE": str(tmp / "cache") if args.cache == "warm" else "off"}
        if args.cache == "warm":
            run_once(None, tmp / "warm", extra, env)
        runs: dict[str, list[dict]] = {"checkout": [], "baseline": []}
        for i in range(args.runs):
            for name, tree in (("checkout", None), ("baseline", baseline)):
                runs[name].append(run_once(tree, tmp / f"run-{name}", extra, env))
                r = runs[name][-1]
                print(f"run {i + 1} {name:8s}: wall {r['wall_s']:7.1f} s, cpu {r['cpu_s']:7.1f} s", flush=True)
        equal = same_weights(tmp / "run-checkout", tmp / "run-baseline")
    ratio = {k: statistics.median(a[k] / b[k] for a, b in zip(runs["checkout"], runs["baseline"]))
             for k in ("wall_s", "cpu_s")}
    lines = {r["probe_line"] for rs in runs.values() for r in rs}
    result = {"baseline": args.baseline, "args": extra, "threads": args.threads, "cache": args.cache,
              "runs": runs, "median_ratio_checkout_over_baseline": ratio, "weights_bitwise_equal": equal,
              "probe_lines_identical": len(lines) == 1, "torch": torch.__version__, "date": time.strftime("%F %T")}
    Path(args.out).write_text(json.dumps(result, indent=2))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")} for n, rs in runs.items()}
    print(f"median wall: checkout {med['checkout']['wall_s']:.1f} s, baseline {med['baseline']['wall_s']:.1f} s; "
          f"median cpu: checkout {med['checkout']['cpu_s']:.1f} s, baseline {med['baseline']['cpu_s']:.1f} s")
    print(f"pairwise median ratio checkout / baseline: wall {ratio['wall_s']:.3f}, cpu {ratio['cpu_s']:.3f}")
    print(f"final weights bitwise equal: {equal}; probe lines identical: {len(lines) == 1}")
    return 0 if equal and len(lines) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
