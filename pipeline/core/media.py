"""Animated images and short videos → a few sampled frames, by a documented rule and within limits.

The sampling rule ("even-v1")
-----------------------------
An upload with several frames (an animated GIF, WebP or PNG; an MP4, MOV, WebM or Matroska video) is judged on
n = min(max_frames, frames in the upload) of its frames. Its timeline runs from its first frame (time 0) for D
seconds. The targets are t_k = k·D/n for k = 0..n-1, so frame 0 is always sampled and the rest are evenly spaced;
for each target the frame on screen at t_k is taken (the last frame, in decoding order, whose start time is
≤ t_k, to a microsecond), and a frame chosen for two targets is sampled once (so fewer than n frames may be sampled).

- Animated images: D is the sum of the frames' durations (Pillow's info["duration"], in ms); a missing duration
  or one of 10 ms or less counts as 100 ms, as browsers do. Every frame is decoded in order (seek()).
- Videos: the first video stream is decoded in order, without seeking (an index may lie). A frame's time is its
  presentation time (pts × time_base), or its position / the stream's average rate when it has no pts. When the
  container declares a valid duration (finite, > 0, ≤ max_seconds) it is D, and only the chosen frames are kept.
  Otherwise every 2^j-th decoded frame is kept (j doubling whenever more than 2·max_frames are kept), D is the
  last decoded frame's time, and the targets are taken among the kept frames.
- At most about 2·max_frames decoded frames are held at once, whatever the upload declares.

Limits, each a stable `ImageError` code: a declared or decoded timeline over max_seconds is `video.too_long`;
more than max_decoded_frames frames decoded is `video.too_many_frames`; decoding past decode_timeout_s of wall
time (checked between packets and frames) is `video.decode_timeout`. Videos also end in `video.no_video_stream`,
`video.unsupported_codec`, `video.too_large` (a frame, declared or decoded, over max_pixels; or the file over
max_bytes), `video.no_frames`, `video.truncated` and `video.corrupt` (see `pipeline.core.video`); an animation's
pixel and damage problems keep the still images' `image.*` codes.

A sampled frame is named by `frame_key(upload sha256, rule id, index)`: the same upload sampled by the same rule
gives the same keys, so a frame's artifacts can be stored and found like an image's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from pipeline.core.errors import ImageError

RULE_VERSION = "even-v1"  # bump when the choice of frames changes: every frame key changes with it
SHORTEST_FRAME_MS = 10  # an animation frame this short or shorter (or with no duration) is shown for ...
DEFAULT_FRAME_MS = 100  # ... this long, as browsers do
TOLERANCE_S = 1e-6  # a frame starting this close after a target counts as on screen at it (float rounding)
ANIMATABLE = ("GIF", "PNG", "WEBP")  # the still formats that may hold several frames

D = TypeVar("D")


@dataclass(frozen=True)
class FrameRule:
    """How many frames an animation or video is judged on, and the limits its decoding runs within."""

    max_frames: int = 8  # frames sampled per upload, 1..64
    max_seconds: float = 60.0  # longest timeline accepted
    max_decoded_frames: int = 3000  # frames decoded at most (endless streams, billions declared)
    decode_timeout_s: float = 20.0  # wall time decoding one upload
    max_bytes: int = 64 * 2**20  # largest video/animation file accepted (still images keep their own limit)

    def __post_init__(self):
        _require(isinstance(self.max_frames, int) and 1 <= self.max_frames <= 64, "max_frames", "an int in 1..64")
        _require(_positive(self.max_seconds), "max_seconds", "a finite number of seconds > 0")
        _require(
            isinstance(self.max_decoded_frames, int) and self.max_decoded_frames >= 1,
            "max_decoded_frames",
            "an int >= 1",
        )
        _require(_positive(self.decode_timeout_s), "decode_timeout_s", "a finite number of seconds > 0")
        _require(isinstance(self.max_bytes, int) and self.max_bytes >= 1, "max_bytes", "an int >= 1")

    @property
    def id(self) -> str:
        """The rule's version and every parameter that changes which frames are sampled (not the limits)."""
        return f"{RULE_VERSION}:n={self.max_frames}"


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _require(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"FrameRule.{name} must be {what}.")


@dataclass(frozen=True)
class Frame:
    index: int  # 0-based position among the sampled frames
    time_s: float  # presentation time in the upload, seconds from its first frame (3 decimals)
    key: str  # frame_key(upload_sha256, rule.id, index)
    image: Image.Image  # RGB, 8-bit


def frame_key(upload_sha256: str, rule_id: str, index: int) -> str:
    return hashlib.sha256(f"{upload_sha256}|{rule_id}|{index}".encode()).hexdigest()


def frame_images(decoded: D) -> list[D]:
    """Each sampled frame of a decoded upload as a `DecodedImage` of its own (sha256 = the frame's key, format
    "FRAME", kind "frame", no bytes and no provenance of its own); a still image is its own only frame."""
    frames = getattr(decoded, "frames", ())
    if not frames:
        return [decoded]
    return [
        dataclasses.replace(
            decoded, image=frame.image, sha256=frame.key, format="FRAME", width=frame.image.width,
            height=frame.image.height, n_bytes=0, provenance=None, kind="frame", frames=(), duration_s=None,
            pdq=None, pdq_quality=None,
        )
        for frame in frames
    ]  # fmt: skip


def sniff_video(data: bytes) -> str | None:
    """ "MP4", "MOV", "WEBM" or "MKV" by the file's magic numbers (an ISO ftyp box; an EBML header and its
    DocType), else None. Nothing else is looked at."""
    if data[4:8] == b"ftyp" and len(data) >= 12:
        return "MOV" if data[8:12] == b"qt  " else "MP4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return {b"webm": "WEBM", b"matroska": "MKV"}.get(_ebml_doctype(data))
    return None


def _vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at `pos`: (value, next position), or None if malformed."""
    if pos >= len(data) or data[pos] == 0:
        return None
    length = 8 - data[pos].bit_length() + 1
    if pos + length > len(data):
        return None
    value = data[pos] if keep_marker else data[pos] & (0xFF >> length)
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    return value, pos + length


def _ebml_doctype(data: bytes) -> bytes | None:
    header = _vint(data, 4, keep_marker=False)
    if header is None:
        return None
    size, pos = header
    end = min(len(data), pos + size, 4096)
    while pos < end:
        element, size_at = _vint(data, pos, keep_marker=True) or (None, end)
        sized = _vint(data, size_at, keep_marker=False) if element is not None else None
        if sized is None:
            return None
        size, start = sized
        if element == 0x4282:
            return data[start : start + size].rstrip(b"\x00")
        pos = start + size
    return None


def choose(starts: Sequence[float], duration: float, n: int) -> list[int]:
    """Positions in `starts` (frame start times from the first frame, in decoding order) the rule samples for n
    targets over `duration`: for each t_k = k·duration/n the last frame starting at or before it; no repeats."""
    chosen: list[int] = []
    for k in range(n):
        target = k * duration / n
        last = 0
        for position, start in enumerate(starts):
            if start <= target + TOLERANCE_S:
                last = position
        if last not in chosen:
            chosen.append(last)
    return sorted(chosen)


class Clock:
    """The wall-clock and frame-count limits of one upload's decoding."""

    def __init__(self, rule: FrameRule):
        self.rule = rule
        self.deadline = time.monotonic() + rule.decode_timeout_s
        self.decoded = 0

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise ImageError(
                f"Decoding took longer than {self.rule.decode_timeout_s:g} s.", code="video.decode_timeout"
            )

    def count_frame(self) -> None:
        self.decoded += 1
        if self.decoded > self.rule.max_decoded_frames:
            raise ImageError(
                f"The upload has more than {self.rule.max_decoded_frames:,} frames.", code="video.too_many_frames"
            )
        self.check()

    def check_time(self, seconds: float) -> None:
        if seconds > self.rule.max_seconds:
            raise ImageError(
                f"The upload runs for more than {self.rule.max_seconds:g} s; the limit is {self.rule.max_seconds:g} s.",
                code="video.too_long",
            )


def make_frames(sha256: str, rule: FrameRule, chosen: Sequence[tuple[float, Image.Image]]) -> tuple[Frame, ...]:
    """The sampled frames, keyed, from (time from the first frame, RGB image) in timeline order."""
    return tuple(
        Frame(index=i, time_s=round(t, 3), key=frame_key(sha256, rule.id, i), image=image)
        for i, (t, image) in enumerate(chosen)
    )


def is_animated(image: Image.Image) -> bool:
    """Whether an opened GIF/PNG/WebP holds more than one frame (Pillow reads no pixels to tell); a file whose
    header cannot tell is a still image, and its still decoding reports what is wrong with it."""
    try:
        return bool(getattr(image, "is_animated", False))
    except Exception:
        return False


def animation_frames(
    image: Image.Image, rule: FrameRule, *, sha256: str, max_pixels: int, convert: Callable[[Image.Image], Image.Image]
) -> tuple[tuple[Frame, ...], float]:
    """The sampled frames of an opened animated image and its timeline's length in seconds. Two passes: every
    frame is decoded once to learn the durations (keeping its pixels only while there are few frames), then
    the chosen ones are decoded again if they were not kept. `convert` turns a frame into 8-bit RGB."""
    clock = Clock(rule)
    starts: list[float] = []
    kept: list[Image.Image] | None = []  # every frame while they are few (≤ 2·max_frames): no second pass
    elapsed = 0.0
    position = 0
    while True:
        clock.check()
        if not _seek(image, position):
            break
        clock.count_frame()
        pixels = _load(image, max_pixels)
        starts.append(elapsed)
        elapsed += _frame_seconds(image.info.get("duration"))
        clock.check_time(elapsed)
        if kept is not None and len(kept) < 2 * rule.max_frames:
            kept.append(pixels.copy())
        else:
            kept = None
        position += 1
    if not starts:
        raise ImageError("The animation has no frames that can be decoded.", code="image.corrupt")
    chosen = choose(starts, elapsed, min(rule.max_frames, len(starts)))
    pictures = []
    for position in chosen:
        if kept is not None:
            pictures.append(kept[position])
            continue
        clock.check()
        if not _seek(image, position):
            raise ImageError("The animation changed between two readings.", code="image.corrupt")
        pictures.append(_load(image, max_pixels).copy())
    frames = make_frames(
        sha256, rule, [(starts[p], convert(picture)) for p, picture in zip(chosen, pictures, strict=True)]
    )
    return frames, round(elapsed, 3)


def _frame_seconds(duration) -> float:
    ms = duration if isinstance(duration, int | float) and math.isfinite(duration) else 0
    return (ms if ms > SHORTEST_FRAME_MS else DEFAULT_FRAME_MS) / 1000


def _seek(image: Image.Image, position: int) -> bool:
    """Moves to frame `position`; False past the last one. Damage found on the way is `image.corrupt`."""
    try:
        image.seek(position)
        return image.tell() == position
    except EOFError:
        return False
    except Exception as error:
        raise ImageError(
            f"The {image.format} animation is damaged and cannot be decoded.", code="image.corrupt"
        ) from error


def _load(image: Image.Image, max_pixels: int) -> Image.Image:
    if image.width * image.height > max_pixels:
        raise ImageError(
            f"An animation frame is {image.width}x{image.height} pixels; the limit is {max_pixels:,} pixels.",
            code="image.too_large",
        )
    try:
        image.load()
    except OSError as error:
        if "truncated" in str(error).lower() or "broken data stream" in str(error).lower():
            raise ImageError(
                f"The {image.format} file is truncated (incomplete upload?).", code="image.truncated"
            ) from error
        raise ImageError(
            f"The {image.format} animation is damaged and cannot be decoded.", code="image.corrupt"
        ) from error
    except Exception as error:
        raise ImageError(
            f"The {image.format} animation is damaged and cannot be decoded.", code="image.corrupt"
        ) from error
    return image
