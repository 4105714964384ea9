"""Unit tests for pipeline.core.imaging: untrusted bytes to an RGB image, or a typed refusal.

Every test image is generated here with Pillow/numpy; nothing is read from disk or the network.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.core.errors import ImageError
from pipeline.core.imaging import (
    ALLOWED_FORMATS,
    BACKGROUND,
    PAD_COLOR,
    StageImage,
    decode_image,
    downscale,
    letterbox,
    sniff_format,
    thumbnail_jpeg,
    to_rgb,
)

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
LOSSY = {"JPEG", "WEBP"}
QUADRANTS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def quadrant_image(width: int = 48, height: int = 32) -> Image.Image:
    """Four solid quadrants: survives lossy codecs well enough to check colours at their centres."""
    image = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    boxes = (
        (0, 0, half_w, half_h),
        (half_w, 0, width, half_h),
        (0, half_h, half_w, height),
        (half_w, half_h, width, height),
    )
    for colour, box in zip(QUADRANTS, boxes, strict=True):
        image.paste(colour, box)
    return image


def quadrant_centres(width: int = 48, height: int = 32) -> list[tuple[int, int]]:
    return [(width // 4 + dx * width // 2, height // 4 + dy * height // 2) for dy in (0, 1) for dx in (0, 1)]


def refuse(data: bytes, **limits) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode_image(data, **limits)
    return caught.value


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR is rewritten to claim another size (CRC recomputed, IDAT left small)."""
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    assert data[12:16] == b"IHDR"
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def assert_sentence(error: ImageError) -> None:
    message = str(error)
    assert message == error.message
    assert message.strip() and message[0].isupper() and " " in message


# --- accepted formats ---------------------------------------------------------------------------------------


def test_allowed_formats_are_the_six_sniffed_formats():
    assert sorted(ALLOWED_FORMATS) == sorted(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_accepted_format_round_trips(fmt):
    # given
    data = encode(quadrant_image(), fmt)
    # when
    decoded = decode_image(data)
    # then
    assert sniff_format(data) == fmt
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (48, 32) == (decoded.width, decoded.height)
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    assert decoded.n_bytes == len(data)
    tolerance = 12 if fmt in LOSSY else 0
    for colour, xy in zip(QUADRANTS, quadrant_centres(), strict=True):
        got = decoded.image.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, colour, strict=True)) <= tolerance, (xy, got, colour)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoding_is_deterministic(fmt):
    rng = np.random.default_rng(7)
    data = encode(Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)), fmt)
    first, second = decode_image(data), decode_image(data)
    assert first.image.tobytes() == second.image.tobytes()
    assert first.sha256 == second.sha256


# --- refusals -----------------------------------------------------------------------------------------------


def test_empty_bytes_are_refused():
    error = refuse(b"")
    assert error.code == "image.empty"
    assert_sentence(error)


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE html><html><body><img src='x.png'></body></html>",
        b"<html><head></head></html>",
        b'<?xml version="1.0" encoding="UTF-8"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"<svg xmlns='http://www.w3.org/2000/svg'></svg>",
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n",
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40,
        b"hello, this is just some text and not an image at all\n",
        np.random.default_rng(0).bytes(1024),
    ],
    ids=["html-doctype", "html", "svg-xml", "svg", "pdf", "zip", "text", "random-bytes"],
)
def test_non_images_are_refused_as_unsupported(data):
    error = refuse(data)
    assert error.code == "image.unsupported_format"
    assert_sentence(error)


def test_zip_archive_is_named_in_the_refusal():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photo.png", encode(quadrant_image(), "PNG"))
    error = refuse(buffer.getvalue())
    assert error.code == "image.unsupported_format"
    assert "ZIP" in str(error)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused_as_truncated(fmt):
    # given: a noisy image (so the pixel data is most of the file), cut in half
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    # when
    error = refuse(data[: len(data) // 2])
    # then
    assert error.code == "image.truncated"
    assert_sentence(error)


def test_png_signature_followed_by_garbage_is_corrupt():
    error = refuse(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(256))
    assert error.code == "image.corrupt"
    assert_sentence(error)


def test_corrupt_message_names_no_python_internals():
    error = refuse(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(2).bytes(256))
    assert "<_io." not in str(error) and " at 0x" not in str(error)


def test_more_pixels_than_max_pixels_is_too_large():
    error = refuse(encode(quadrant_image(64, 64), "PNG"), max_pixels=64 * 64 - 1)
    assert error.code == "image.too_large"
    assert_sentence(error)


def test_exactly_max_pixels_is_accepted():
    assert decode_image(encode(quadrant_image(64, 64), "PNG"), max_pixels=64 * 64).width == 64


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [(5_000, 5_000, 1_000_000), (100_000, 100_000, 40_000_000)],
    ids=["over-max-pixels", "decompression-bomb"],
)
def test_header_size_is_refused_before_any_pixel_is_decoded(width, height, max_pixels):
    # given: a header claiming a huge image over only 8x8 worth of pixel data; decoding it would be
    # refused as truncated/corrupt, so too_large can only come from the header check
    data = png_with_claimed_size(width, height)
    # when
    started = time.perf_counter()
    error = refuse(data, max_pixels=max_pixels)
    elapsed = time.perf_counter() - started
    # then
    assert error.code == "image.too_large"
    assert elapsed < 1.0
    assert_sentence(error)


def test_claimed_size_under_the_limit_reaches_the_decoder():
    # the patched header is not refused for its own sake: under the limit the missing pixel data is found
    error = refuse(png_with_claimed_size(300, 300), max_pixels=1_000_000)
    assert error.code in {"image.truncated", "image.corrupt"}


def test_more_bytes_than_max_bytes_is_too_large():
    data = encode(quadrant_image(), "PNG")
    error = refuse(data, max_bytes=len(data) - 1)
    assert error.code == "image.too_large"
    assert str(len(data) - 1) in str(error).replace(",", "")
    assert decode_image(data, max_bytes=len(data)).n_bytes == len(data)


# --- conversions --------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    red, green, blue = decoded.image.getpixel((8, 8))
    assert red >= 240 and green <= 15 and blue <= 15


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    # given
    values = np.array([[0, 32896, 65535, 257 * 10]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    # when
    pixels = np.asarray(decode_image(data).image)
    # then: value / 257, the same on every channel
    assert pixels.shape == (1, 4, 3)
    assert (pixels == pixels[..., :1]).all()
    black, middle, white, dark = (int(v) for v in pixels[0, :, 0])
    assert (black, white, dark) == (0, 255, 10)
    assert abs(middle - 128) <= 1


def test_palette_png_keeps_palette_colours():
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    image = Image.new("P", (3, 1))
    image.putpalette([channel for colour in colours for channel in colour])
    image.putdata([0, 1, 2])
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    decoded = decode_image(data).image
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0)) for x in range(3)] == colours


def test_palette_transparency_becomes_background():
    colours = [(250, 10, 10), (10, 250, 10)]
    image = Image.new("P", (2, 1))
    image.putpalette([channel for colour in colours for channel in colour])
    image.putdata([0, 1])
    decoded = decode_image(encode(image, "PNG", transparency=1)).image
    assert decoded.getpixel((0, 0)) == colours[0]
    assert decoded.getpixel((1, 0)) == BACKGROUND != colours[1]


def test_rgba_transparent_pixels_become_background():
    image = Image.new("RGBA", (2, 1))
    image.putdata([(10, 20, 30, 255), (10, 20, 30, 0)])
    decoded = decode_image(encode(image, "PNG")).image
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (10, 20, 30)
    assert decoded.getpixel((1, 0)) == BACKGROUND


def test_grayscale_with_alpha_becomes_rgb_on_background():
    image = Image.new("LA", (2, 1))
    image.putdata([(50, 255), (50, 0)])
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    decoded = decode_image(data).image
    assert decoded.getpixel((0, 0)) == (50, 50, 50)
    assert decoded.getpixel((1, 0)) == BACKGROUND


@pytest.mark.parametrize(
    ("mode", "pixels", "key"),
    [("L", [7, 200], 7), ("RGB", [(10, 20, 30), (1, 2, 3)], (10, 20, 30))],
)
def test_colour_key_transparency_becomes_background(mode, pixels, key):
    image = Image.new(mode, (2, 1))
    image.putdata(pixels)
    decoded = decode_image(encode(image, "PNG", transparency=key)).image
    assert decoded.getpixel((0, 0)) == BACKGROUND


def test_plain_grayscale_becomes_equal_channels():
    values = np.arange(0, 256, 16, dtype=np.uint8).reshape(2, 8)
    pixels = np.asarray(decode_image(encode(Image.fromarray(values), "PNG")).image)
    assert pixels.shape == (2, 8, 3)
    for channel in range(3):
        assert (pixels[..., channel] == values).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "F", "1"])
def test_to_rgb_always_returns_rgb_of_the_same_size(mode):
    image = Image.new(mode, (5, 3))
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.size == (5, 3)


def test_exif_orientation_is_applied():
    # given: 40x20, left half red, right half blue, tagged "rotate 90 CW to display"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    # when
    decoded = decode_image(data)
    # then: upright, and the left half is now on top
    assert (decoded.width, decoded.height) == (20, 40)
    top, bottom = decoded.image.getpixel((10, 8)), decoded.image.getpixel((10, 32))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def _oriented_jpeg(orientation: int) -> bytes:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = image.getexif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


@settings(max_examples=150, deadline=None)
@given(
    orientation=st.integers(0, 10),
    damage=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
)
def test_a_damaged_exif_block_decodes_upright_or_is_refused_never_crashes(orientation, damage):
    """The EXIF block is read before the pixels are used (is the image upright?): bytes flipped in the first 400
    bytes, the EXIF segment and the header, end as an RGB image or a typed refusal, never another exception."""
    data = bytearray(_oriented_jpeg(orientation))
    for offset, value in damage:
        data[offset % len(data)] = value
    try:
        decoded = decode_image(bytes(data))
    except ImageError:
        return
    # the header may be damaged too: any size, as long as the image is what it says it is
    assert decoded.image.mode == "RGB" and decoded.image.size == (decoded.width, decoded.height)
    assert decoded.width >= 1 and decoded.height >= 1


def test_animated_gif_is_judged_on_its_first_frame():
    colours = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]
    frames = [Image.new("RGB", (16, 16), colour) for colour in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode_image(data)
    assert decoded.format == "GIF"
    assert set(decoded.image.getdata()) == {colours[0]}


# --- geometry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(48, 32), (20, 50)])
def test_letterbox_pads_bottom_right_with_pad_colour(size):
    # given
    width, height = size
    rng = np.random.default_rng(3)
    original = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # when
    boxed = np.asarray(letterbox(Image.fromarray(original)))
    # then
    side = max(size)
    assert boxed.shape == (side, side, 3)
    assert (boxed[:height, :width] == original).all()
    padding = np.ones((side, side), dtype=bool)
    padding[:height, :width] = False
    assert (boxed[padding] == PAD_COLOR).all()


def test_letterbox_leaves_square_images_alone():
    image = quadrant_image(32, 32)
    assert letterbox(image).tobytes() == image.tobytes()


@pytest.mark.parametrize(("size", "expected"), [((3000, 2000), (800, 533)), ((2000, 3000), (533, 800))])
def test_downscale_brings_the_longer_side_to_the_limit_keeping_the_aspect(size, expected):
    staged = downscale(quadrant_image(*size), 800)
    assert staged.image.size == expected
    assert (staged.scale_x, staged.scale_y) == pytest.approx((size[0] / expected[0], size[1] / expected[1]))
    # the quadrants are where they were: a smooth filter, no shift
    assert staged.image.getpixel((expected[0] // 4, expected[1] // 4)) == QUADRANTS[0]
    assert staged.image.getpixel((3 * expected[0] // 4, 3 * expected[1] // 4)) == QUADRANTS[3]


@pytest.mark.parametrize("size", [(800, 600), (64, 64), (1, 800)])
def test_downscale_leaves_images_within_the_limit_alone(size):
    image = quadrant_image(*size)
    staged = downscale(image, 800)
    assert staged.image is image and (staged.scale_x, staged.scale_y) == (1.0, 1.0)
    assert downscale(image, None).image is image


def test_stage_boxes_map_to_the_original_and_back():
    staged = StageImage(Image.new("RGB", (800, 533)), 3000 / 800, 2000 / 533)
    whole = staged.to_original((0.0, 0.0, 800.0, 533.0))
    assert whole == (0.0, 0.0, 3000.0, 2000.0)  # an edge box stays on the edge, exactly
    box = (10.5, 20.25, 400.0, 300.75)
    assert staged.from_original(staged.to_original(box)) == pytest.approx(box, abs=0.01)


def _opened(jpeg: bytes) -> Image.Image:
    assert jpeg.startswith(b"\xff\xd8\xff")  # a JPEG by its magic number, whatever Pillow would guess
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


@pytest.mark.parametrize("size", [(1024, 768), (768, 1024), (1000, 333), (3000, 2000), (5000, 3)])
def test_thumbnail_brings_the_longer_side_to_the_limit_keeping_the_aspect(size):
    jpeg, width, height = thumbnail_jpeg(quadrant_image(*size), 256)
    factor = 256 / max(size)
    assert (width, height) == (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
    assert max(width, height) == 256
    assert _opened(jpeg).size == (width, height)


def test_thumbnail_keeps_the_quadrants_where_they_were():
    thumbnail = _opened(thumbnail_jpeg(quadrant_image(1200, 800), 256)[0])
    width, height = thumbnail.size
    for colour, (x, y) in zip(QUADRANTS, [(1, 1), (3, 1), (1, 3), (3, 3)], strict=True):
        seen = thumbnail.getpixel((x * width // 4, y * height // 4))
        assert max(abs(a - b) for a, b in zip(seen, colour, strict=True)) < 12, (colour, seen)


@pytest.mark.parametrize("size", [(64, 48), (256, 100), (1, 1)])
def test_thumbnail_never_upscales(size):
    jpeg, width, height = thumbnail_jpeg(quadrant_image(*size), 256)
    assert (width, height) == size and _opened(jpeg).size == size


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16"])
def test_thumbnail_of_any_mode_is_an_rgb_jpeg(mode):
    jpeg, width, height = thumbnail_jpeg(quadrant_image(400, 300).convert(mode), 100)
    assert _opened(jpeg).size == (width, height) == (100, 75)


def test_thumbnail_size_is_bounded_by_its_pixels_not_the_original():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8))
    jpeg, width, height = thumbnail_jpeg(noise, 128)
    assert (width, height) == (128, 128)
    assert len(jpeg) < 128 * 128 * 3  # below the raw pixels even for noise, the worst case of JPEG


def test_thumbnail_carries_no_metadata_of_the_upload():
    exif = Image.Exif()
    exif[0x010E] = "private description"
    upload = encode(quadrant_image(600, 400), "JPEG", exif=exif.tobytes(), comment=b"private comment")
    image = decode_image(upload).image
    for max_side in (256, 1000):  # downscaled, and kept at its size
        jpeg, _, _ = thumbnail_jpeg(image, max_side)
        assert b"private" not in jpeg


def test_thumbnail_needs_a_positive_side():
    with pytest.raises(ValueError, match="max_side"):
        thumbnail_jpeg(quadrant_image(), 0)
