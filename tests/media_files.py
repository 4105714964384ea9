"""Animations and videos built by the tests themselves, in memory, by PyAV and Pillow (no file is downloaded).

Frame i of every file is a solid `frame_color(i)`, and `frame_number` tells from a decoded pixel which frame it
was, so a test can see which frames a rule sampled. The hostile files are real files, damaged the way uploads
are: cut short, declaring a huge length, holding no video, resizing mid-stream, or garbage behind a header.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import numpy as np
from PIL import Image

DEFAULT_CODECS = {"mp4": "libx264", "mov": "libx264", "webm": "libvpx-vp9", "mkv": "mjpeg"}
CONTAINERS = {"mp4": "mp4", "mov": "mov", "webm": "webm", "mkv": "matroska"}


def frame_color(i: int) -> tuple[int, int, int]:
    """A colour per frame, 40 levels apart in some channel from every other of the first 216 frames."""
    return (i % 6) * 40 + 8, (i // 6 % 6) * 40 + 8, (i // 36 % 6) * 40 + 8


def frame_number(rgb, count: int) -> int:
    """Which of the first `count` frames a decoded colour is (the nearest: lossy codecs move colours a little)."""
    pixel = np.asarray(rgb, dtype=np.int64)[:3]
    return min(range(count), key=lambda i: int(np.abs(pixel - np.asarray(frame_color(i))).sum()))


def _pix_fmt(codec: str) -> str:
    return {"mjpeg": "yuvj420p", "prores_ks": "yuv422p10le"}.get(codec, "yuv420p")


def video_bytes(
    fmt: str = "mp4",
    frames: int = 10,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    codec: str | None = None,
    options: dict | None = None,
    colors=None,
) -> bytes:
    """A real video: `frames` frames at `fps`, frame i a solid `frame_color(i)` (or `colors(i)`)."""
    import av

    codec = codec or DEFAULT_CODECS[fmt]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=CONTAINERS[fmt], options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = _pix_fmt(codec)
        if codec == "libsvtav1":
            stream.options = {"preset": "12"}
        for i in range(frames):
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[:] = (colors or frame_color)(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _animation(fmt: str, durations, size, **params) -> bytes:
    images = [Image.new("RGB", size, frame_color(i)) for i in range(len(durations))]
    buffer = io.BytesIO()
    images[0].save(buffer, fmt, save_all=True, append_images=images[1:], duration=list(durations), loop=0, **params)
    return buffer.getvalue()


def animated_gif(durations=(100,) * 10, size=(32, 24)) -> bytes:
    """A GIF whose frame i is `frame_color(i)`, shown durations[i] ms (GIF stores hundredths)."""
    return _animation("GIF", durations, size, disposal=1, optimize=False)


def animated_webp(durations=(100,) * 10, size=(32, 24)) -> bytes:
    return _animation("WEBP", durations, size, lossless=True)


def apng(durations=(100,) * 10, size=(32, 24)) -> bytes:
    return _animation("PNG", durations, size, disposal=0, blend=0)


# --- Hostile files -------------------------------------------------------------------------------------------


def truncated_video(fraction: float = 0.9, frames: int = 30) -> bytes:
    """A fragmented MP4 (index first, as streamed) cut short: frames decode, then the stream breaks."""
    data = video_bytes("mp4", frames=frames, options={"movflags": "frag_keyframe+empty_moov"})
    return data[: int(len(data) * fraction)]


def audio_only(codec: str = "aac", fmt: str = "mp4") -> bytes:
    """A file with one audio stream (a second of silence) and no video."""
    import av

    buffer = io.BytesIO()
    rate = 48000
    with av.open(buffer, "w", format=CONTAINERS[fmt]) as container:
        stream = container.add_stream(codec, rate=rate)
        samples = 960 if codec == "libopus" else 1024
        for i in range(rate // samples):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * samples
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def huge_duration_webm(seconds: float = 1e9, frames: int = 10) -> bytes:
    """A small WebM whose Segment Info declares a length of `seconds` (FFmpeg recomputes an MP4's length from its
    sample tables, so a lying MP4 header is not what it reads; a Matroska Duration element is)."""
    data = bytearray(video_bytes("webm", frames=frames))
    at = data.find(b"\x44\x89")  # the Duration element: a float of milliseconds
    size = data[at + 2] & 0x7F
    assert at > 0 and size in (4, 8)
    data[at + 3 : at + 3 + size] = struct.pack(">d" if size == 8 else ">f", seconds * 1000)
    return bytes(data)


def garbage_after_ftyp(garbage: bytes = b"\xff" * 200) -> bytes:
    return b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + garbage


def resizing_mkv(sizes=((32, 32), (32, 32), (640, 480))) -> bytes:
    """A Matroska Motion-JPEG stream declaring the first frame's size, whose later frames are larger."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuvj420p"
        for i, size in enumerate(sizes):
            encoder = av.CodecContext.create("mjpeg", "w")
            encoder.width, encoder.height, encoder.pix_fmt = size[0], size[1], "yuvj420p"
            encoder.time_base = Fraction(1, 10)
            pixels = np.empty((size[1], size[0], 3), np.uint8)
            pixels[:] = frame_color(i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuvj420p")
            frame.pts = i
            for packet in encoder.encode(frame):
                packet.stream, packet.pts, packet.dts = stream, i * 100, i * 100
                container.mux(packet)
    return buffer.getvalue()
