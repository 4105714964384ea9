"""Video containers (MP4, MOV, WebM, Matroska) → the frames the rule of `pipeline.core.media` samples, by PyAV.

Hostile files end in stable codes, never in FFmpeg's own exceptions (their text holds addresses and changes
between versions): a container that cannot be opened, or fails before its first frame, is `video.corrupt`; one
that fails after frames were decoded is `video.truncated`; no video stream is `video.no_video_stream`; a codec
off the allow-list is `video.unsupported_codec`; a stream with nothing decodable is `video.no_frames`; a frame
(declared or decoded: the size may change mid-stream) over max_pixels is `video.too_large`. The timeline limits
are `pipeline.core.media.Clock`'s.

The container is read from memory with the demuxer its magic numbers name (FFmpeg never guesses, so a playlist
or a concat script is never opened), small probing limits, and one decoding thread: the worker decodes several
uploads at once on threads of its own.
"""

from __future__ import annotations

import contextlib
import io
import math

from pipeline.core.errors import ImageError
from pipeline.core.media import TOLERANCE_S, Clock, Frame, FrameRule, choose, make_frames

# The video decoders we run on untrusted bytes: the codecs people's videos are actually in, each a decoder
# that FFmpeg fuzzes continuously. Anything else (old or exotic codecs, less used, less fuzzed) is refused.
ALLOWED_CODECS = {
    "h264": "H.264/AVC: most phone, camera and web video, and most generated-video exports",
    "hevc": "H.265/HEVC: iPhone and recent camera recordings",
    "vp8": "VP8: older WebM",
    "vp9": "VP9: WebM as browsers and YouTube write it",
    "av1": "AV1: recent web video and screen recordings (decoded by libdav1d)",
    "mpeg4": "MPEG-4 Part 2: older cameras, phones and screen recorders",
    "mjpeg": "Motion JPEG: webcams and some cameras (MOV/MKV)",
    "prores": "Apple ProRes: editing exports in MOV",
}
DEMUXERS = {"MP4": "mov", "MOV": "mov", "WEBM": "matroska", "MKV": "matroska"}
OPEN_OPTIONS = {"probesize": "5000000", "analyzeduration": "5000000"}  # bytes, microseconds
FALLBACK_RATE = 25.0  # frames a second, for a frame with no pts in a stream that declares no rate


def video_frames(
    data: bytes, video_format: str, rule: FrameRule, *, sha256: str, max_pixels: int
) -> tuple[tuple[Frame, ...], float]:
    """The sampled frames of a video upload, and its timeline's length in seconds."""
    import av

    clock = Clock(rule)
    container = None
    try:
        try:
            container = av.open(io.BytesIO(data), mode="r", format=DEMUXERS[video_format], options=OPEN_OPTIONS)
        except Exception as error:
            raise _corrupt(video_format) from error
        clock.check()
        stream = _video_stream(container)
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > rule.max_seconds:
            clock.check_time(declared)
        sampler = _Sampler(rule, declared if declared is not None and declared > 0 else None)
        _decode(container, stream, clock, sampler, max_pixels, video_format)
        chosen, duration = sampler.result()
        return make_frames(sha256, rule, [(t, _rgb(frame, video_format)) for t, frame in chosen]), duration
    except ImageError:
        raise
    except Exception as error:  # a PyAV surprise anywhere above: still a stable code
        raise _corrupt(video_format) from error
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()


def _corrupt(video_format: str) -> ImageError:
    return ImageError(f"The {video_format} file is damaged and cannot be decoded.", code="video.corrupt")


def _video_stream(container):
    streams = list(container.streams.video)
    if not streams:
        raise ImageError("The file holds no video stream.", code="video.no_video_stream")
    stream = streams[0]
    context = stream.codec_context
    codec = getattr(context, "codec", None) if context is not None else None
    name = getattr(codec, "canonical_name", None) if codec is not None else None
    if name not in ALLOWED_CODECS:
        accepted = ", ".join(sorted(ALLOWED_CODECS))
        raise ImageError(
            f"The video codec {name or 'unknown'!s} is not accepted; accepted codecs are {accepted}.",
            code="video.unsupported_codec",
        )
    context.thread_count = 1
    context.thread_type = "NONE"
    return stream


def _declared_seconds(container, stream) -> float | None:
    """The video stream's declared length (the container's when the stream declares none); None if neither
    declares one, NaN-free (an infinite or absurd value is returned as is for the caller to refuse)."""
    seconds = None
    if stream.duration is not None and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    return seconds if seconds is not None and not math.isnan(seconds) else None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"The video's frames are {width}x{height} pixels; the limit is {max_pixels:,} pixels.",
            code="video.too_large",
        )


def _decode(container, stream, clock: Clock, sampler: _Sampler, max_pixels: int, video_format: str) -> None:
    _check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0, max_pixels)
    rate = float(stream.average_rate) if stream.average_rate else FALLBACK_RATE
    first = None
    try:
        for packet in container.demux(stream):
            clock.check()
            for frame in packet.decode():
                clock.count_frame()
                _check_pixels(frame.width, frame.height, max_pixels)
                at = frame.time
                if at is None or not math.isfinite(at):
                    at = (clock.decoded - 1) / rate
                first = at if first is None else first
                clock.check_time(at - first)
                sampler.add(at - first, frame)
    except ImageError:
        raise
    except Exception as error:
        if clock.decoded:
            raise ImageError(
                f"The {video_format} file ends in damaged data (incomplete upload?).", code="video.truncated"
            ) from error
        raise _corrupt(video_format) from error
    if not clock.decoded:
        raise ImageError("The video has no frames that can be decoded.", code="video.no_frames")


def _rgb(frame, video_format: str):
    try:
        return frame.to_image()  # 8-bit RGB, whatever the stream's pixel format
    except Exception as error:
        raise _corrupt(video_format) from error


class _Sampler:
    """Takes decoded frames in order and keeps, of their pixels, only what the rule may still choose."""

    def __init__(self, rule: FrameRule, declared: float | None):
        self.n = rule.max_frames
        self.declared = declared
        self.count = 0
        self.last = 0.0
        if declared is not None:  # the targets are known: each keeps the last frame at or before it ...
            self.targets = [k * declared / self.n for k in range(self.n)]
            self.chosen: list[tuple[float, object] | None] = [None] * self.n
            self.early: list[tuple[float, object]] | None = []  # ... and the first n, in case there are fewer
        else:  # every stride-th frame, the stride doubling to keep at most 2n
            self.kept: list[tuple[int, float, object]] = []
            self.stride = 1

    def add(self, at: float, frame) -> None:
        position, self.count, self.last = self.count, self.count + 1, at
        if self.declared is not None:
            for k, target in enumerate(self.targets):
                if at <= target + TOLERANCE_S:
                    self.chosen[k] = (at, frame)
            if self.early is not None:
                self.early = self.early + [(at, frame)] if len(self.early) < self.n else None
            return
        if position % self.stride == 0:
            self.kept.append((position, at, frame))
            if len(self.kept) > 2 * self.n:
                self.stride *= 2
                self.kept = [one for one in self.kept if one[0] % self.stride == 0]

    def result(self) -> tuple[list[tuple[float, object]], float]:
        """The chosen (time, frame) in order, and the timeline's length."""
        if self.declared is not None:
            if self.early is not None:  # no more frames than targets: the rule's n is their number
                starts = [at for at, _ in self.early]
                return [self.early[p] for p in choose(starts, self.declared, len(starts))], round(self.declared, 3)
            unique = list(dict.fromkeys(id(one) for one in self.chosen if one is not None))
            by_id = {id(one): one for one in self.chosen if one is not None}
            return [by_id[i] for i in unique], round(self.declared, 3)
        # No valid declared length: the last frame's time plus one mean frame period.
        duration = self.last * self.count / (self.count - 1) if self.count > 1 else 0.0
        starts = [at for _, at, _ in self.kept]
        picks = choose(starts, duration, min(self.n, self.count))
        return [(self.kept[p][1], self.kept[p][2]) for p in picks], round(duration, 3)
