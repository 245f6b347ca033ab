"""Decode the frames of one clip from a video file (or its bytes), seeking to the window.

Two decoders behind one small interface (``num_frames``, ``read(indices, short_side)``):

* :class:`PyAVReader` (``data.decoder: pyav``, the default): PyAV's wheels bundle FFmpeg. It seeks to the
  key frame before the window and decodes from there, instead of from the start of the file.
* :class:`TorchCodecReader` (``data.decoder: torchcodec``): PyTorch's decoder, ``get_frames_at``; it needs
  FFmpeg's shared libraries on the system (Debian: ``libavcodec59 libavformat59 ...``).

Frame ``i`` is the frame shown at time ``i / fps`` (``fps``: the stream's average rate), so a
variable-frame-rate video is sampled evenly in time. Anything that stops a file from giving its clip
(missing, empty, not a container, no video stream, a decoder error, no frames) raises :class:`BadVideo`
with the reason; the dataset decides whether to replace the sample or stop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import MissingDependencyError, install_extra

__all__ = ["BadVideo", "PyAVReader", "TorchCodecReader", "open_reader", "scaled_size"]


class BadVideo(Exception):
    """A video that cannot give a clip; ``str(e)`` says why (e.g. ``has no video stream``)."""


class _ShortRead(Exception):
    """The container promised more frames than it holds; ``num_frames`` is what it really holds."""

    def __init__(self, num_frames: int):
        super().__init__(num_frames)
        self.num_frames = num_frames


def _import_av():
    try:
        import av  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:
        raise MissingDependencyError(f"decoding video files needs PyAV: {install_extra('video')}") from e
    return av


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled so that the short side is ``short_side`` (``None``: unchanged)."""
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


class PyAVReader:
    """One opened video: ``num_frames`` (from the container; 0 when it does not say) and
    :meth:`read`. ``source``: a path or a binary file object. Decodes on one thread: a data-loader
    worker is the unit of parallelism."""

    def __init__(self, source: Any):
        av = _import_av()
        try:
            self.container = av.open(source)
        except FileNotFoundError:
            raise BadVideo("file not found") from None
        except Exception as e:  # noqa: BLE001 - any failure to open means "not a video container"
            raise BadVideo(f"does not open as a video container ({type(e).__name__}: {e})") from None
        if not self.container.streams.video:
            self.close()
            raise BadVideo("has no video stream")
        self.stream = s = self.container.streams.video[0]
        s.thread_type = "SLICE"
        s.thread_count = 1
        rate = s.average_rate or s.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.time_base = float(s.time_base) if s.time_base else 0.0
        self.start_pts = s.start_time or 0
        n = int(s.frames or 0)
        if n <= 0 and self.fps > 0:
            if s.duration and self.time_base:
                n = math.floor(s.duration * self.time_base * self.fps + 0.5)
            elif self.container.duration:
                n = math.floor(self.container.duration / 1e6 * self.fps + 0.5)
        self.num_frames = n
        self._used = False  # the demuxer still stands at the start

    def count_frames(self) -> int:
        """The number of frames, counted from the packets (no decoding) when the container does not say."""
        try:
            n = sum(1 for packet in self.container.demux(self.stream) if packet.size)
            self.container.seek(self.start_pts, stream=self.stream, backward=True, any_frame=False)
            self._used = False
        except Exception as e:  # noqa: BLE001 - a demuxer error names the video, the run goes on
            raise BadVideo(f"demuxer error ({type(e).__name__}: {e})") from None
        self.num_frames = n
        return n

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> PyAVReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _index(self, frame: Any) -> int | None:
        if frame.pts is None or not self.time_base or not self.fps:
            return None
        return round((frame.pts - self.start_pts) * self.time_base * self.fps)

    def _frames(self, first: int):
        """(index, frame) in presentation order, from the key frame before frame ``first`` on (from the
        start when the stream has no usable time stamps or the seek landed after ``first``)."""
        if first > 0 and self.fps and self.time_base:
            self._used = True
            pts = self.start_pts + int(first / self.fps / self.time_base)
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
            frames = self.container.decode(self.stream)
            head = next(frames, None)
            i = None if head is None else self._index(head)
            if i is not None and i <= first:
                yield i, head
                for f in frames:
                    j = self._index(f)
                    i = i + 1 if j is None else j
                    yield i, f
                return
            self.container.seek(self.start_pts, stream=self.stream, backward=True, any_frame=False)
        elif self._used:  # a second read of this reader: back to the start
            self.container.seek(self.start_pts, stream=self.stream, backward=True, any_frame=False)
        self._used = True
        i = -1
        for f in self.container.decode(self.stream):
            j = self._index(f)
            i = i + 1 if j is None else j
            yield i, f

    def read(self, indices: Sequence[int], short_side: int | None = None) -> np.ndarray:
        """``uint8 [T, H, W, 3]`` (RGB) of the frames ``indices``, each scaled so that its short side is
        ``short_side``. Raises :class:`BadVideo`, or ``_ShortRead`` when the file ends before the last
        index (the caller redraws with the true length)."""

        def rgb(frame: Any) -> np.ndarray:
            w, h = scaled_size(frame.width, frame.height, short_side)
            return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()

        wanted = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        k, prev, seen = 0, None, -1
        try:
            for i, frame in self._frames(wanted[0]):
                seen = max(seen, i)
                while k < len(wanted) and wanted[k] < i:  # a gap in the time stamps: the frame shown then
                    got[wanted[k]] = rgb(prev if prev is not None else frame)
                    k += 1
                if k < len(wanted) and wanted[k] == i:
                    got[i] = rgb(frame)
                    k += 1
                if k == len(wanted):
                    break
                prev = frame
        except Exception as e:  # noqa: BLE001 - a decoder error names the video, the run goes on
            raise BadVideo(f"decoder error ({type(e).__name__}: {e})") from None
        if k < len(wanted):
            if seen < 0:
                raise BadVideo("decoded to no frames")
            raise _ShortRead(seen + 1)
        return np.stack([got[i] for i in indices])


class TorchCodecReader:
    """The same interface on torchcodec's ``VideoDecoder`` (header metadata, ``approximate`` seeking,
    one FFmpeg thread; frames scaled by the decoder)."""

    def __init__(self, source: Any):
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: PLC0415 - optional dependency
        except Exception as e:  # noqa: BLE001 - ImportError, or FFmpeg's libraries missing (RuntimeError)
            raise MissingDependencyError(
                'data.decoder "torchcodec" needs torchcodec and FFmpeg\'s shared libraries: '
                f'{install_extra("torchcodec")}; and e.g. apt-get install libavcodec59 libavformat59 '
                f'libavutil57 libswscale6 libswresample4 libavfilter8 libavdevice59 ({type(e).__name__}: {e})'
            ) from None
        self._cls = VideoDecoder
        self._source = source
        try:
            probe = VideoDecoder(source, seek_mode="approximate", num_ffmpeg_threads=1)
        except FileNotFoundError:
            raise BadVideo("file not found") from None
        except Exception as e:  # noqa: BLE001 - no video stream, not a container, empty
            raise BadVideo(f"does not open as a video ({type(e).__name__}: {e})") from None
        meta = probe.metadata
        self.width, self.height = meta.width, meta.height
        self.num_frames = int(meta.num_frames or 0)
        self._decoder = probe

    def close(self) -> None:
        self._decoder = None

    def __enter__(self) -> TorchCodecReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read(self, indices: Sequence[int], short_side: int | None = None) -> np.ndarray:
        from torchvision.transforms import v2  # noqa: PLC0415 - with torchcodec only

        w, h = scaled_size(self.width, self.height, short_side)
        try:
            if (w, h) != (self.width, self.height):
                if hasattr(self._source, "seek"):
                    self._source.seek(0)
                decoder = self._cls(self._source, seek_mode="approximate", num_ffmpeg_threads=1,
                                    dimension_order="NHWC", transforms=[v2.Resize((h, w), antialias=True)])
            else:
                decoder = self._cls(self._source, seek_mode="approximate", num_ffmpeg_threads=1, dimension_order="NHWC")
            uniq = sorted(set(indices))
            if uniq[-1] >= self.num_frames:
                raise _ShortRead(self.num_frames)
            frames = decoder.get_frames_at(uniq).data.numpy()
        except _ShortRead:
            raise
        except IndexError:
            raise _ShortRead(self.num_frames) from None
        except Exception as e:  # noqa: BLE001 - a decoder error names the video, the run goes on
            raise BadVideo(f"decoder error ({type(e).__name__}: {e})") from None
        got = dict(zip(uniq, frames))
        return np.stack([got[i] for i in indices])


def open_reader(decoder: str, source: Any) -> PyAVReader | TorchCodecReader:
    """A reader of ``source`` (path or binary file object) for ``data.decoder``."""
    return TorchCodecReader(source) if decoder == "torchcodec" else PyAVReader(source)
