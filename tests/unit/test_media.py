"""Animations and videos sampled into frames (pipeline.core.media, pipeline.core.video), on real files."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.core.batches import Reader
from pipeline.core.errors import ImageError
from pipeline.core.imaging import decode_image
from pipeline.core.media import FrameRule, choose, frame_images, frame_key, sniff_video
from tests import media_files as m
from worker.codes import REJECTED

RULE = FrameRule()


def sampled(decoded, count=216) -> list[int]:
    return [m.frame_number(frame.image.getpixel((0, 0)), count) for frame in decoded.frames]


def refused(data, rule=RULE, **limits) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, frames=rule, **limits)
    assert caught.value.code in REJECTED
    return caught.value


# --- The rule ----------------------------------------------------------------------------------------------


def test_choose_takes_the_frame_on_screen_at_evenly_spaced_targets():
    assert choose([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 10, 5) == [0, 2, 4, 6, 8]
    assert choose([0, 1, 2], 3, 3) == [0, 1, 2]
    assert choose([0, 5, 5.5, 6], 8, 4) == [0, 3]  # targets 0, 2, 4, 6: frames 0, 0, 0, 3; repeats dropped
    assert choose([0.0], 0.1, 1) == [0]


@pytest.mark.parametrize("fmt", ["mp4", "mov", "webm", "mkv"])
def test_every_container_samples_evenly_over_its_timeline(fmt):
    decoded = decode_image(m.video_bytes(fmt, frames=20, fps=10), frames=RULE)
    assert (decoded.kind, decoded.format, decoded.duration_s) == ("video", fmt.upper(), 2.0)
    assert sampled(decoded) == [0, 2, 5, 7, 10, 12, 15, 17]  # targets k·2.0/8 s: the frame on screen at each
    assert [f.time_s for f in decoded.frames] == [0.0, 0.2, 0.5, 0.7, 1.0, 1.2, 1.5, 1.7]
    assert [f.index for f in decoded.frames] == list(range(8))
    assert decoded.image is decoded.frames[0].image and decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48) and decoded.frame_rule == "even-v1:n=8"


@pytest.mark.parametrize(
    "codec,fmt", [("mpeg4", "mp4"), ("libvpx", "webm"), ("prores_ks", "mov"), ("libsvtav1", "mp4")]
)
def test_every_allowed_codec_decodes(codec, fmt):
    decoded = decode_image(m.video_bytes(fmt, frames=4, size=(64, 64), codec=codec), frames=RULE)
    assert sampled(decoded) == [0, 1, 2, 3]  # fewer frames than max_frames: every one


def test_a_short_video_has_each_frame_once_and_a_small_rule_fewer():
    assert sampled(decode_image(m.video_bytes("mp4", frames=5), frames=RULE)) == [0, 1, 2, 3, 4]
    decoded = decode_image(m.video_bytes("mp4", frames=20), frames=FrameRule(max_frames=1))
    assert sampled(decoded) == [0] and decoded.frame_rule == "even-v1:n=1"


def test_a_video_without_a_declared_length_keeps_a_bounded_sample():
    # An MKV of Motion JPEG packets that declare no duration: the kept frames are every 2^j-th.
    decoded = decode_image(m.video_bytes("mkv", frames=100, fps=10), frames=FrameRule(max_frames=4))
    assert len(decoded.frames) == 4 and sampled(decoded)[0] == 0


@pytest.mark.parametrize("make", [m.animated_gif, m.animated_webp, m.apng])
def test_animations_sample_by_their_frame_durations(make):
    decoded = decode_image(make((100,) * 20), frames=RULE)
    assert (decoded.kind, decoded.duration_s) == ("animation", 2.0)
    assert sampled(decoded) == [0, 2, 5, 7, 10, 12, 15, 17]
    uneven = decode_image(make((1000, 100, 100, 100, 0, 0, 500)), frames=RULE)
    # Starts 0, 1.0, 1.1, 1.2, 1.3, 1.4 (0 ms counts as 100), 1.5; D = 2.0; targets every 0.25 s
    assert uneven.duration_s == 2.0 and sampled(uneven) == [0, 2, 5, 6]
    assert [f.time_s for f in uneven.frames] == [0.0, 1.1, 1.4, 1.5]


def test_a_long_animation_decodes_the_chosen_frames_again():
    decoded = decode_image(m.animated_gif((50,) * 60), frames=FrameRule(max_frames=3))
    assert sampled(decoded) == [0, 20, 40]


# --- Still images, and no rule ----------------------------------------------------------------------------


def _still(fmt, **params):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("data", [_still("JPEG"), _still("PNG"), _still("GIF"), _still("WEBP"), m.animated_gif((100,))])
def test_a_still_image_decodes_as_without_a_rule(data):
    today, ruled = decode_image(data), decode_image(data, frames=RULE)
    assert today == ruled or (today.image.tobytes() == ruled.image.tobytes() and today.sha256 == ruled.sha256)
    assert (ruled.kind, ruled.frames, ruled.duration_s, ruled.frame_rule) == ("image", (), None, None)


def test_without_a_rule_animations_are_their_first_frame_and_videos_are_refused():
    first = decode_image(m.animated_gif((100,) * 5))
    assert first.kind == "image" and m.frame_number(first.image.getpixel((0, 0)), 5) == 0
    with pytest.raises(ImageError) as caught:
        decode_image(m.video_bytes("mp4"))
    assert caught.value.code == "image.unsupported_format"


def test_size_limits_by_kind():
    gif = m.animated_gif((100,) * 5)
    assert decode_image(gif, max_bytes=10, frames=RULE).kind == "animation"  # the animation limit applies
    assert refused(gif, FrameRule(max_bytes=10)).code == "image.too_large"
    assert refused(m.video_bytes("mp4"), FrameRule(max_bytes=10)).code == "video.too_large"
    assert refused(_still("PNG"), max_bytes=10).code == "image.too_large"  # a still image keeps its own
    assert refused(b"").code == "image.empty"


# --- Hostile files -----------------------------------------------------------------------------------------


def test_hostile_files_end_in_stable_codes():
    assert refused(m.audio_only("aac", "mp4")).code == "video.no_video_stream"
    assert refused(m.audio_only("libopus", "webm")).code == "video.no_video_stream"
    assert refused(m.truncated_video(0.9)).code == "video.truncated"
    assert refused(m.truncated_video(0.5)).code == "video.corrupt"
    assert refused(m.garbage_after_ftyp()).code == "video.corrupt"
    assert refused(m.garbage_after_ftyp(b"")).code == "video.corrupt"
    assert refused(m.huge_duration_webm()).code == "video.too_long"
    assert refused(m.video_bytes("mp4", frames=30, fps=1), FrameRule(max_seconds=10)).code == "video.too_long"
    assert refused(m.animated_gif((1000,) * 12), FrameRule(max_seconds=10)).code == "video.too_long"
    assert refused(m.video_bytes("mp4", frames=50), FrameRule(max_decoded_frames=40)).code == "video.too_many_frames"
    assert refused(m.animated_gif((20,) * 50), FrameRule(max_decoded_frames=40)).code == "video.too_many_frames"
    assert refused(m.video_bytes("mp4", size=(256, 256)), max_pixels=10_000).code == "video.too_large"
    assert refused(m.animated_gif(size=(256, 256)), max_pixels=10_000).code == "image.too_large"


def test_a_frame_larger_than_declared_mid_stream_is_refused():
    assert decode_image(m.resizing_mkv(), frames=RULE, max_pixels=10_000 // 1 * 100).kind == "video"
    error = refused(m.resizing_mkv(), max_pixels=10_000)
    assert error.code == "video.too_large" and "640x480" in error.message


def test_an_unsupported_codec_is_refused():
    # FFV1 in Matroska: a real video codec, off the allow-list.
    data = _ffv1_mkv()
    assert refused(data).code == "video.unsupported_codec"


def _ffv1_mkv() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_decoding_stops_at_its_time_limit():
    data = m.video_bytes("mp4", frames=300, fps=30, size=(320, 240))
    limit = 0.002  # decoding its 300 frames takes tens of milliseconds
    started = time.monotonic()
    assert refused(data, FrameRule(decode_timeout_s=limit)).code == "video.decode_timeout"
    assert time.monotonic() - started < limit + 0.5
    assert refused(m.animated_gif((100,) * 300, size=(200, 200)), FrameRule(decode_timeout_s=0.01)).code == (
        "video.decode_timeout"
    )


# --- Keys, frames as images, the rule's checks, sniffing ----------------------------------------------------


def test_frame_keys_are_stable_and_distinct():
    data = m.video_bytes("mp4", frames=20)
    one, two = decode_image(data, frames=RULE), decode_image(data, frames=RULE)
    keys = [f.key for f in one.frames]
    assert keys == [f.key for f in two.frames] and len(set(keys)) == len(keys)
    assert keys[3] == frame_key(one.sha256, "even-v1:n=8", 3) and len(keys[3]) == 64
    other = decode_image(data, frames=FrameRule(max_frames=4))
    assert not set(keys) & {f.key for f in other.frames}
    assert FrameRule(max_seconds=5, decode_timeout_s=1).id == RULE.id  # limits do not change which frames


def test_frame_images():
    decoded = decode_image(m.animated_gif((100,) * 4), frames=RULE)
    images = frame_images(decoded)
    assert [i.sha256 for i in images] == [f.key for f in decoded.frames]
    assert {(i.kind, i.format, i.n_bytes, i.provenance, i.frames) for i in images} == {("frame", "FRAME", 0, None, ())}
    assert images[2].image is decoded.frames[2].image and (images[2].width, images[2].height) == (32, 24)
    still = decode_image(_still("PNG"), frames=RULE)
    assert frame_images(still) == [still]


@pytest.mark.parametrize(
    "params",
    [{"max_frames": 0}, {"max_frames": 65}, {"max_seconds": 0}, {"max_seconds": float("inf")},
     {"max_decoded_frames": 0}, {"decode_timeout_s": -1}, {"max_bytes": 0}, {"max_frames": 2.5}],
)  # fmt: skip
def test_the_rule_checks_its_ranges(params):
    with pytest.raises(ValueError, match="FrameRule"):
        FrameRule(**params)


def test_sniff_video():
    assert sniff_video(m.video_bytes("mp4")) == "MP4"
    assert sniff_video(m.video_bytes("mov", codec="mjpeg")) == "MOV"
    assert sniff_video(m.video_bytes("webm")) == "WEBM"
    assert sniff_video(m.video_bytes("mkv")) == "MKV"
    assert sniff_video(_still("PNG")) is None and sniff_video(b"") is None
    assert sniff_video(b"\x1a\x45\xdf\xa3\xff") is None  # EBML with a broken header: not a video we know


def test_the_reader_passes_the_rule_through():
    reader = Reader(frames=FrameRule(max_frames=2), threads=1)
    inputs = reader.load([m.video_bytes("webm", frames=10), _still("JPEG")], lambda data: data)
    assert [one.image.kind for one in inputs] == ["video", "image"]
    assert len(inputs[0].image.frames) == 2
    assert Reader(threads=1).load([m.video_bytes("webm")], lambda d: d)[0].error.code == "image.unsupported_format"
