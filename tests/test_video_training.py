"""The reference trainer on real video files: a folder and WebDataset shards, stopped and resumed with
data-loader workers (bitwise the uninterrupted run), the same weights for any number of workers, a bad
file on the way, and a 2-process (gloo) run on shards with the folder index built once on rank 0.

The 2-process part runs this file as a script under 2 spawned processes (``python test_video_training.py OUT``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from teardown_abort import forgive_teardown_abort, save_atomic  # noqa: E402
from video_helpers import av, needs_av, write_clip  # noqa: E402

from layerlock_plugin.reference.config import load_config  # noqa: E402
from layerlock_plugin.reference.train import Trainer  # noqa: E402

TINY = [
    "train.batch_size=4", "train.steps=8", "train.log_every=1", "train.ckpt_every=100", "train.progress=false",
    "schedule.pixel_steps=3", "schedule.interval=2", "schedule.max_frozen=2", "warmup.steps=2",
    "optim.warmup_steps=2", "probe.enabled=false", "train.threads=1", "data.frame_stride=[1, 2]",
    "data.decode_size=36",
]
STOP = 5


def make_videos(base: Path) -> tuple[Path, str]:
    """A folder of 6 clips (one of them unreadable) and 3 shards of the 5 good ones (2 per shard)."""
    from layerlock_plugin.reference.data.video_shards import write_shards

    root = base / "videos"
    for i in range(5):
        write_clip(root / f"v{i}.mp4", 20, shift=i)
    (root / "zz_broken.mp4").write_bytes(b"not a video" * 30)
    shard_src = base / "good"
    for i in range(5):
        write_clip(shard_src / f"v{i}.mp4", 20, shift=i)
    write_shards(str(shard_src), str(base / "s-%02d.tar"), per_shard=2)
    return root, str(base / "s-{00..02}.tar")


def folder_args(root: Path) -> list[str]:
    return ["data.source=folder", f"data.root={root}"]


def shard_args(urls: str) -> list[str]:
    return ["data.source=shards", f"data.urls={urls}", "data.label_key=null"]


def run(out: Path, data: list[str], *extra: str, stop_after=None, resume=None, workers=2) -> Trainer:
    cfg = load_config(None, [f"out_dir={out}", *TINY, *data, f"train.num_workers={workers}", *extra])
    torch.manual_seed(99)  # resume must not depend on the caller's RNG state
    trainer = Trainer(cfg, resume=resume, echo=lambda s: None)
    trainer.fit(stop_after=stop_after)
    return trainer


def same_weights(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    pytest.importorskip("webdataset")
    if av is None:
        pytest.skip('needs PyAV: pip install "layerlock-plugin[video]"')
    return make_videos(tmp_path_factory.mktemp("train_videos"))


@needs_av
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_stop_and_resume_with_workers_equals_the_uninterrupted_run(tmp_path, videos, source, capfd):
    root, urls = videos
    data = folder_args(root) if source == "folder" else shard_args(urls)
    full = run(tmp_path / "full", data)
    part = run(tmp_path / "part", data, stop_after=STOP)
    assert part.step == STOP
    resumed = run(tmp_path / "part", data, resume=tmp_path / "part")
    assert resumed.step == 8 and same_weights(full, resumed), "the resumed run diverged from the uninterrupted one"
    if source == "folder":
        # the same clips whatever the number of workers: the same weights
        assert same_weights(full, run(tmp_path / "w0", data, workers=0))
        # 8 steps x 4 clips over 6 videos: the broken file is drawn, replaced and named (on stderr)
        err = capfd.readouterr().err
        assert "bad video zz_broken.mp4: does not open as a video container" in err and "bad so far" in err


@needs_av
def test_repeated_sampling_and_num_clips_must_divide_the_rank_batch(tmp_path, videos):
    root, _ = videos
    t = run(tmp_path / "k2", folder_args(root), "data.num_clips=2", stop_after=2)
    assert t.step == 2
    from layerlock_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="data.num_clips"):
        run(tmp_path / "k3", folder_args(root), "data.num_clips=3")


@needs_av
def test_cli_bad_video_under_raise_is_one_line_and_exit_code_2(tmp_path, videos, capsys):
    from layerlock_plugin.reference.cli import main

    root, _ = videos
    sets = [x for a in [*TINY, *folder_args(root), "data.on_bad_video=raise", "train.num_workers=1"] for x in ("--set", a)]
    code = main(["--out", str(tmp_path / "run"), *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("layerlock-train: error: bad video zz_broken.mp4: does not open"), err
    assert not any("Traceback" in line for line in err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_av
@pytest.mark.timeout(330)
def test_two_ranks_on_shards_resume_exactly_and_share_one_folder_index(tmp_path, videos):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(HERE), str(tmp_path), videos[1], str(videos[0])], env=env,
                          cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    # a rank killed by a signal is reported by the launcher below as "rank exit code: N"
    codes = [0] if proc.returncode == 0 else [
        int(c) for c in re.findall(r"^rank exit code: (-?\d+)$", proc.stderr, flags=re.M)]
    results = [tmp_path / f"rank{r}.pt" for r in (0, 1)]
    forgive_teardown_abort(codes, proc.stdout[-3000:] + proc.stderr, results, "the 2-rank shards run")
    r0, r1 = (torch.load(path, weights_only=True) for path in results)
    for r in (r0, r1):
        assert r["resume_equal"], "the 2-rank run resumed from its DCP checkpoint diverged"
        assert r["index_calls"] == (1 if r is r0 else 0) and r["index_len"] == 6
    for a, b in zip(r0["shards_read"], r1["shards_read"]):  # per epoch: disjoint, together every shard
        assert not set(a) & set(b) and set(a) | set(b) == {0, 1, 2}


# -- the worker (runs in each of the 2 processes) ------------------------------------------------------------
def _worker(rank: int, world: int, out: Path, urls: str, root: str) -> None:
    import torch.distributed as dist

    from layerlock_plugin.reference.data import video_folder
    from layerlock_plugin.reference.data.video_shards import VideoShardsDataset
    from layerlock_plugin.reference.train import trainer as trainer_module

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict = {}
    data = shard_args(urls)
    # no loader workers here (a spawned process starts each one from scratch: seconds); workers: above
    full = run(out / "full", data, "train.strategy=ddp", workers=0)
    run(out / "part", data, "train.strategy=ddp", stop_after=STOP, workers=0)
    resumed = run(out / "part", data, "train.strategy=ddp", resume=out / "part", workers=0)
    report["resume_equal"] = same_weights(full, resumed)
    ds = VideoShardsDataset(full.config.data, rank=rank, world_size=world, batch_size=2)
    report["shards_read"] = [sorted(ds.role_shards(e, 0, 1)) for e in range(3)]
    # the folder index: built by rank 0 alone, sent to rank 1
    calls = []
    real = video_folder.build_index
    trainer_module.build_index = lambda cfg: calls.append(1) or real(cfg)
    cfg = load_config(None, [f"out_dir={out / 'idx'}", *TINY, *folder_args(Path(root)), "train.strategy=ddp"])
    env = trainer_module.setup("ddp", "cpu")
    index = trainer_module._index_once(cfg, env)
    report["index_calls"], report["index_len"] = len(calls), len(index.paths)
    save_atomic(report, out / f"rank{rank}.pt")  # complete before the teardown (see teardown_abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out_dir, shard_urls, folder = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    try:
        mp.spawn(_worker, args=(2, out_dir, shard_urls, folder), nprocs=2, join=True)
    except mp.ProcessExitedException as e:  # killed by a signal (a Python exception is ProcessRaisedException)
        print(f"rank exit code: {e.exit_code}", file=sys.stderr)
        raise
