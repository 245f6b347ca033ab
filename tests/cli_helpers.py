"""Drive ``layerlock-train`` as a user would and read its exit code and output: the installed executable in a
subprocess (:func:`run_cli`), or its ``main()`` in this process (:func:`run_main`).

A subprocess costs a Python + torch start-up (seconds on a slow CI core) and is what process-level behaviour
needs: signals, a kill, the exit code and stderr a terminal shows, warnings at import. Everything else (run
folders, resume, budgets, config errors) reads the same exit code, stdout and stderr from ``run_main``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

#: A few seconds of training: events at steps 6, 10, 14 (warmup 3 < interval 4, so no warmup warning).
TINY_SETS = [
    "data.num_videos=64", "train.batch_size=8", "train.steps=24", "train.log_every=1", "train.ckpt_every=100",
    "schedule.pixel_steps=6", "schedule.interval=4", "schedule.max_frozen=3", "warmup.steps=3",
    "optim.warmup_steps=3", "guard.every=2", "train.threads=1",
    "probe.train_videos=48", "probe.test_videos=48", "probe.max_iter=20",
]


def tiny_args(*extra: str, probe: bool = False) -> list[str]:
    args = [a for s in TINY_SETS for a in ("--set", s)] + ["--no-progress"]
    return args + ([] if probe else ["--no-probe"]) + list(extra)


def command() -> list[str]:
    exe = shutil.which("layerlock-train")
    return [exe] if exe else [sys.executable, "-m", "layerlock_plugin.reference.cli"]


def run_cli(args: list[str], cwd: Path, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(command() + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings')
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``layerlock-train ARGS`` run in this process from the folder ``cwd``: exit code, stdout and stderr as
    :func:`run_cli` returns them. As in a fresh process, warnings are shown once per place on stderr
    (``PYTHONWARNINGS=default``) and an exception that escapes ``main()`` prints its traceback with exit code 1;
    the caller's working folder and torch thread count are restored."""
    from layerlock_plugin.reference.cli import main

    import torch

    out, err = io.StringIO(), io.StringIO()
    threads, here = torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("default")
            warnings.showwarning = _show_on_stderr  # not pytest's recorder: a user sees them on stderr
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, a bad flag (it printed its message itself)
                code = e.code if isinstance(e.code, int) or e.code is None else 1
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)  # as the interpreter does with a non-integer exit code
                code = code or 0
            except Exception:  # what Python does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["layerlock-train", *map(str, args)], code, out.getvalue(), err.getvalue())


def checksums(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256): a folder is unchanged when these are equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path: Path, drop=("elapsed_s",)) -> list[dict]:
    """JSONL rows without the wall-clock fields (which differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in path.read_text().splitlines() if line.strip()]
