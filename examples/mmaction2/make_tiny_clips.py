"""Write a handful of short mp4 clips (OpenCV, 'mp4v') and an annotation list for the tiny config.

    python examples/mmaction2/make_tiny_clips.py        # into $LAYERLOCK_RUN/data (default runs/mmaction2_tiny/data)

Each clip is a bright square moving over a textured background (direction and colour differ per
clip), so that the tiny pretraining has something to predict. Writes ``<out>/videos/clip_XX.mp4`` and
``<out>/train_list.txt`` (``clip_XX.mp4 <label>`` per line, the VideoDataset format). Needs
``opencv-python-headless``; decord (from the mmaction extra) reads the files back.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def write_clips(out: str | Path, num_clips: int = 4, num_frames: int = 24, size: int = 40, seed: int = 0) -> Path:
    """Write ``num_clips`` clips of ``num_frames`` frames of ``size x size`` pixels; returns the ann file."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - only without OpenCV
        raise SystemExit("make_tiny_clips.py needs OpenCV: pip install opencv-python-headless") from exc
    out = Path(out)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_clips):
        path = videos / f"clip_{i:02d}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8.0, (size, size))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV could not open a 'mp4v' writer for {path}")
        background = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
        colour = tuple(int(c) for c in rng.integers(130, 256, size=3))
        dx, dy = (1, 0) if i % 2 == 0 else (0, 1)
        for t in range(num_frames):
            frame = background.copy()
            x, y = (4 + dx * t) % (size - 10), (4 + dy * t) % (size - 10)
            frame[y : y + 10, x : x + 10] = colour
            writer.write(frame)
        writer.release()
        lines.append(f"{path.name} {i % 2}")
    ann = out / "train_list.txt"
    ann.write_text("\n".join(lines) + "\n")
    return ann


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run = os.environ.get("LAYERLOCK_RUN", "runs/mmaction2_tiny")  # the example configs read the same variable
    parser.add_argument("--out", default=f"{run}/data", help="output folder (default: $LAYERLOCK_RUN/data = %(default)s)")
    parser.add_argument("--num-clips", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=24)
    args = parser.parse_args()
    ann = write_clips(args.out, args.num_clips, args.num_frames)
    print(f"wrote {args.num_clips} clips and {ann}")


if __name__ == "__main__":
    main()
