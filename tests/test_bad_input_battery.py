"""``layerlock-train`` against bad input: config fields, YAML files, CLI flags and resume folders (missing,
truncated, foreign, from another model, from another config, a copy).

For every case: exit code 2, exactly one line on stderr that names the field (or the file) and says what
is allowed, no traceback, nothing written in the working folder, and every existing run folder
byte-identical afterwards. Every case runs through the command line's ``main()`` in this process; one case
of each kind (a YAML file, a flag, a field the built trainer checks, a resume folder) also runs as the
installed executable in its own process, where exit code, stderr and start-up warnings are the process's
own.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cli_helpers import checksums, run_cli, run_main, tiny_args

YAML_FILES = {
    "syntax.yaml": "model:\n  preset: tiny\n  depth: [1, 2\n",
    "list.yaml": "- model\n- data\n",
    "unknown.yaml": "modle:\n  depth: 3\n",
    "badfield.yaml": "optim:\n  lr: fast\n",
    "tabs.yaml": "model:\n\tpreset: tiny\n",
}

# (arguments, what the one error line must name)
CASES: list[tuple[list[str], str]] = [
    # config fields through --set
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "optim.lr=abc"], "optim.lr"),
    (["--set", "optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["--set", "optim.betas=[0.9]"], "optim.betas"),
    (["--set", "optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["--set", "optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    (["--set", "optim.grad_clip=-1"], "optim.grad_clip"),
    (["--set", "train.steps=0"], "train.steps"),
    (["--set", "train.steps=1.5"], "train.steps"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.log_every=0"], "train.log_every"),
    (["--set", "train.ckpt_every=-5"], "train.ckpt_every"),
    (["--set", "train.num_workers=-1"], "train.num_workers"),
    (["--set", "train.threads=-1"], "train.threads"),
    (["--set", "train.progress=maybe"], "train.progress"),
    (["--set", "train.device=tpu"], "train.device"),
    (["--set", "train.strategy=horovod"], "train.strategy"),
    (["--set", "train.strategy=spmd"], "train.strategy"),  # XLA's data parallel on a CPU run
    (["--set", "train.device=xla", "--set", "train.strategy=ddp"], "train.strategy"),
    (["--set", "train.device=xla", "--set", "train.compile=true"], "train.compile"),
    (["--set", "train.device=xla", "--set", "train.activation_checkpointing=true"], "train.activation_checkpointing"),
    (["--set", "train.precision=fp8"], "train.precision"),
    (["--set", "train.grad_accum=3"], "train.grad_accum"),
    (["--set", "train.peak_tflops=-1"], "train.peak_tflops"),
    (["--set", "method=byol"], "method"),
    (["--set", "seed=-1"], "seed"),
    (["--set", "model.depth=0"], "model.depth"),
    (["--set", "model.depht=3"], "model.depht"),
    (["--set", "model.tubelet=[2,7,7]"], "model.tubelet"),
    (["--set", "model.num_heads=5"], "model.num_heads"),
    (["--set", "model.decoder_depth=6"], "model.decoder_depth"),
    (["--set", "model.mask_ratio=1"], "model.mask_ratio"),
    (["--set", "model.mask_ratio=0.999"], "model.mask_ratio"),
    (["--set", "model.rope=sideways"], "model.rope"),
    (["--set", "model.rope=none"], "model.pos_embed"),
    (["--set", "model.rope_split=[0.5,0.5,0.5]"], "model.rope_split"),
    (["--set", "model.preset=huge"], "model.preset"),
    (["--set", "data.size=64"], "data.size"),
    (["--set", "data.num_videos=0"], "data.num_videos"),
    (["--set", "data.source=s3"], "data.source"),
    (["--set", "schedule.interval=0"], "schedule.interval"),
    (["--set", "schedule.max_frozen=4"], "schedule.max_frozen"),
    (["--set", "schedule.kind=magic"], "schedule.kind"),
    (["--set", "schedule.kind=adaptive", "--set", "schedule.adaptive.window=1"], "schedule.adaptive.window"),
    (["--set", "target.kind=voxels"], "target.kind"),
    (["--set", "target.mode=all"], "target.mode"),
    (["--set", "target.loss_fraction=0"], "target.loss_fraction"),
    (["--set", "target.context=partial"], "target.context"),
    (["--set", "warmup.steps=-1"], "warmup.steps"),
    (["--set", "warmup.start_factor=2"], "warmup.start_factor"),
    (["--set", "guard.policy=panic"], "guard.policy"),
    (["--set", "probe.train_videos=0"], "probe.train_videos"),
    (["--set", "nosuchsection.x=1"], "nosuchsection"),
    (["--set", "model=3"], "model"),
    (["--set", "novalue"], "--set"),
    (["--set", "=3"], "--set"),
    (["--set", "model.tubelet=[2,8"], "--set model.tubelet"),
    # YAML files
    (["--config", "missing.yaml"], "--config"),
    (["--config", "syntax.yaml"], "--config syntax.yaml: line 4, column 1"),
    (["--config", "list.yaml"], "--config"),
    (["--config", "unknown.yaml"], "modle"),
    (["--config", "badfield.yaml"], "optim.lr"),
    (["--config", "tabs.yaml"], "--config tabs.yaml: line 2"),
    (["--config", "binary.yaml"], "--config"),
    (["--config", "runs"], "--config"),
    # CLI flags
    (["--steps", "abc"], "--steps"),
    (["--seed", "-3"], "seed"),
    (["--dry-run", "--world-size", "0"], "--world-size"),
    (["--world-size", "4"], "--world-size"),
    (["--stop-after", "0"], "--stop-after"),
    (["--stop-after", "2000"], "--stop-after"),
    (["--extend", "40"], "--extend"),
    (["--probe", "--no-probe"], "--no-probe"),
    (["--bogus-flag"], "--bogus-flag"),
    (["--method", "byol"], "method"),
    (["--out", "runs/file.txt"], "out_dir"),
    (["--out", "runs/notes"], "out_dir"),
    (["--out", "runs/done"], "out_dir"),
    (["--dry-run", "--world-size", "3", "--set", "train.strategy=ddp"], "train.batch_size"),
    (["--dry-run", "--world-size", "64"], "train.strategy"),
    # resume folders
    (["--resume", "runs/missing"], "--resume"),
    (["--resume", "runs/empty"], "--resume"),
    (["--resume", "runs/truncated"], "runs/truncated/checkpoint.pt"),
    (["--resume", "runs/foreign"], "runs/foreign/checkpoint.pt"),
    (["--resume", "runs/garbage"], "runs/garbage/checkpoint.pt"),
    (["--resume", "runs/othermodel", "--config", "tiny"], "model.embed_dim"),
    (["--resume", "runs/part", "--set", "schedule.interval=5"], "schedule.interval"),
    (["--resume", "runs/part", "--set", "train.steps=40"], "train.steps"),
    (["--resume", "runs/part", "--set", "train.steps=4"], "train.steps"),
    (["--resume", "runs/part", "--steps", "40"], "train.steps"),
    (["--resume", "runs/done"], "train.steps"),
    (["--resume", "runs/part", "--out", "runs/done"], "out_dir"),
    (["--resume", "runs/part", "--out", "runs/part/sub"], "out_dir"),
    (["--resume", "runs/part", "--overwrite"], "--overwrite"),
    (["--resume", "runs/part", "--extend", "24"], "--extend"),
    (["--resume", "runs/part", "--extend", "20"], "--extend"),
    (["--resume", "runs/part", "--extend", "40", "--steps", "50"], "--extend"),
    (["--resume", "runs/part", "--stop-after", "5"], "--stop-after"),
    (["--resume", "runs/nodcp"], "runs/nodcp"),
    (["--resume", "runs/part", "--set", "train.strategy=ddp"], "train.strategy"),
    (["--resume", "loose.pt"], "--out"),
    (["--resume", "runs/copy", "--out", "runs/part"], "out_dir"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with runs of every kind a user may point the CLI at."""
    root = tmp_path_factory.mktemp("battery")
    runs = root / "runs"
    # (othermodel's checkpoint matters only for its model: one step is enough)
    for name, extra in (("done", ()), ("part", ("--stop-after", "12")),
                        ("othermodel", ("--set", "model.embed_dim=48", "--stop-after", "1"))):
        out = run_main(tiny_args("--out", f"runs/{name}", *extra), root)
        assert out.returncode == 0, out.stderr
    shutil.copytree(runs / "part", runs / "copy")
    good = (runs / "part" / "checkpoint.pt").read_bytes()
    for name, data in (("truncated", good[: len(good) // 3]), ("garbage", b"not a checkpoint at all" * 10)):
        (runs / name).mkdir()
        (runs / name / "config.yaml").write_text("method: layerlock\n")
        (runs / name / "checkpoint.pt").write_bytes(data)
    (runs / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, runs / "foreign" / "checkpoint.pt")
    (runs / "empty").mkdir()
    (runs / "nodcp" / "dcp" / "step_00000010").mkdir(parents=True)  # a job killed before its first DCP save finished
    (runs / "notes").mkdir()
    (runs / "notes" / "notes.txt").write_text("mine")
    (runs / "file.txt").write_text("a file, not a folder")
    for name, text in YAML_FILES.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    torch.save({"step": 3}, root / "loose.pt")
    return root


# one case of each kind, also run as the installed executable in its own process
IN_A_PROCESS = [
    ["--config", "syntax.yaml"],
    ["--bogus-flag"],
    ["--stop-after", "2000"],  # refused once the trainer is built: the whole trainer stack is imported
    ["--resume", "runs/truncated"],
]


def _failure(args, field, out) -> str | None:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    ok = (out.returncode == 2 and len(lines) == 1 and lines[0].startswith("layerlock-train: error: ")
          and field in lines[0] and "Traceback" not in out.stderr + out.stdout)
    return None if ok else f"{' '.join(args)} -> rc {out.returncode}, stderr {out.stderr.strip()!r}"


def test_every_bad_input_is_one_clear_line_exit_2_and_writes_nothing(workspace):
    assert len(CASES) >= 60 and len({tuple(a) for a, _ in CASES}) == len(CASES)
    fields = {tuple(a): f for a, f in CASES}
    assert all(tuple(a) in fields for a in IN_A_PROCESS)
    before = checksums(workspace)
    failures = [_failure(args, field, run_main(args, workspace)) for args, field in CASES]

    def one(args):
        return args, run_cli(args, workspace, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:  # the start-ups overlap
        failures += [f"(own process) {_failure(args, fields[tuple(args)], out)}"
                     for args, out in pool.map(one, IN_A_PROCESS) if _failure(args, fields[tuple(args)], out)]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
    after = checksums(workspace)
    assert after == before, f"bad input changed files: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    assert not (workspace / "runs" / "part" / "sub").exists()


def test_the_battery_workspace_is_what_it_claims(workspace):
    """The resume cases test what they say only if the fixtures are as described."""
    part = torch.load(workspace / "runs" / "part" / "checkpoint.pt", weights_only=True)
    other = torch.load(workspace / "runs" / "othermodel" / "checkpoint.pt", weights_only=True)
    assert part["step"] == 12 and part["config"]["train"]["steps"] == 24
    assert other["config"]["model"]["embed_dim"] == 48
    assert Path(workspace / "runs" / "copy" / "checkpoint.pt").read_bytes() == \
        Path(workspace / "runs" / "part" / "checkpoint.pt").read_bytes()


def test_the_in_process_runner_shows_what_a_process_would(tmp_path, monkeypatch):
    """The battery reads ``run_main`` as it reads a process: an exception escaping ``main()`` is a traceback
    on stderr with exit code 1 (so it fails the battery), warnings reach stderr, the folder and threads are
    restored."""
    import warnings

    from layerlock_plugin.reference import cli

    threads = torch.get_num_threads()

    def crash(args, package_warnings):
        warnings.warn("a warning from elsewhere", DeprecationWarning)
        torch.set_num_threads(threads + 1)
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "_run", crash)
    out = run_main(["--set", "optim.lr=1e-3"], tmp_path)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValueError: a bug" in out.stderr
    assert "DeprecationWarning: a warning from elsewhere" in out.stderr
    assert _failure(["x"], "optim.lr", out) is not None
    assert torch.get_num_threads() == threads and Path.cwd() != tmp_path
    out = run_main(["--bogus-flag"], tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("layerlock-train: error: unrecognized arguments: --bogus-flag")
