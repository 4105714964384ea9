"""Damaged animations and videos (cut, bytes flipped, pieces spliced in) end as a decoded upload or an
`ImageError` with a stable code, never as another exception or a hang."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.core.errors import ImageError
from pipeline.core.imaging import decode_image
from pipeline.core.media import FrameRule
from tests import media_files as m
from worker.codes import REJECTED

RULE = FrameRule(max_frames=4, decode_timeout_s=2.0, max_decoded_frames=200)


@functools.cache
def _seeds() -> tuple[bytes, ...]:
    return (
        m.video_bytes("mp4", frames=6, size=(32, 32)),
        m.video_bytes("webm", frames=6, size=(32, 32)),
        m.video_bytes("mkv", frames=4, size=(32, 32)),
        m.truncated_video(1.0, frames=6),
        m.animated_gif((100,) * 5, size=(16, 16)),
        m.animated_webp((100,) * 4, size=(16, 16)),
    )


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_seeds())))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["cut", "flip", "splice", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "cut":
            del data[max(at, 12) :]
        elif action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif action == "zero":
            data[at : at + draw(st.integers(1, 32))] = b"\x00" * 8
    return bytes(data)


@settings(max_examples=400, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(mutated())
def test_damaged_media_end_in_a_stable_code(data):
    try:
        decoded = decode_image(data, frames=RULE, max_pixels=4096)
    except ImageError as error:
        assert error.code in REJECTED, error.code
        assert " at 0x" not in error.message
        return
    assert decoded.image.mode == "RGB" and 1 <= len(decoded.frames or (decoded.image,)) <= 4
