"""Untrusted bytes → an RGB image we are willing to feed the models, or a typed refusal.

The order of checks matters: cheap checks on the bytes first (size, magic numbers), then the header
(dimensions, before any pixel is decoded, so a decompression bomb costs nothing), then the full decode
(truncation), and only then the conversions. Every refusal is an `ImageError` with a stable code.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

from pipeline.core.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.errors import ImageError
from pipeline.core.media import ANIMATABLE, Frame, FrameRule, animation_frames, is_animated, sniff_video

if TYPE_CHECKING:
    import torch

    from pipeline.core.provenance import Provenance

Picture = "Image.Image | torch.Tensor"  # what a stage is handed: a Pillow image, or (H, W, 3) uint8 pixels
PAD_COLOR = (124, 116, 104)  # the ImageNet/CLIP mean: padding normalises to about zero in every model
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, the way most viewers show them

# Magic numbers of the formats we accept, mapped to the Pillow plugin allowed to open them.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
ALLOWED_FORMATS = tuple(sorted({fmt for _, _, fmt in _SIGNATURES}))
FILE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}

# Things people upload that are not images, named so the refusal says what was received.
_LOOKALIKES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"<svg", "an SVG drawing (vector images are not accepted)"),
    (b"<?xml", "an XML document"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"PK\x03\x04", "a ZIP archive"),
)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    sha256: str  # of the original bytes: identical uploads share every artifact
    format: str  # "JPEG", "PNG", ...
    width: int
    height: int
    n_bytes: int
    provenance: Provenance | None = None  # what the original bytes declare (see `pipeline.core.provenance`)
    kind: str = "image"  # "image", "animation", "video", or "frame" (one of theirs: `media.frame_images`)
    frames: tuple[Frame, ...] = ()  # an animation's or video's sampled frames; `image` is the first of them
    duration_s: float | None = None  # an animation's or video's timeline, seconds
    frame_rule: str | None = None  # the id of the `FrameRule` that sampled the frames
    pdq: bytes | None = None  # PDQ perceptual hash of `image`, when computed
    pdq_quality: int | None = None  # its quality, 0..100


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    frames: FrameRule | None = None,
) -> DecodedImage:
    """The upload decoded, or an `ImageError`. Without a frame rule an animated image is judged on its first frame
    and a video is refused (`image.unsupported_format`); with one, an animation or a video (MP4, MOV, WebM, MKV)
    is sampled into frames by the rule (`pipeline.core.media`), within its limits, and a still image is decoded
    exactly as without it."""
    if frames is not None:
        moving = _decode_moving(data, max_pixels=max_pixels, max_bytes=max_bytes, rule=frames)
        if moving is not None:
            return moving
    check_size(data, max_bytes)
    image_format = sniff_format(data)
    image = _open_checked(data, image_format, max_pixels)
    image = _orient(image)
    rgb = to_rgb(image)
    return DecodedImage(
        image=rgb,
        sha256=hashlib.sha256(data).hexdigest(),
        format=image_format,
        width=rgb.width,
        height=rgb.height,
        n_bytes=len(data),
    )


def _decode_moving(data: bytes, *, max_pixels: int, max_bytes: int, rule: FrameRule) -> DecodedImage | None:
    """A video or an animated image sampled by `rule`; None for anything else (decoded as a still image then).
    Cheap first: the size of the bytes and their magic numbers, then the header, then the frames."""
    if not data:
        return None
    video_format = sniff_video(data)
    if video_format is not None:
        if len(data) > rule.max_bytes:
            raise ImageError(
                f"The video is {len(data):,} bytes; the limit is {rule.max_bytes:,} bytes.", code="video.too_large"
            )
        from pipeline.core.video import video_frames  # PyAV is imported only when a video comes

        sha256 = hashlib.sha256(data).hexdigest()
        sampled, duration = video_frames(data, video_format, rule, sha256=sha256, max_pixels=max_pixels)
        return _moving(data, sha256, video_format, "video", sampled, duration, rule)
    image_format = _sniffed_or_none(data) if len(data) <= max(max_bytes, rule.max_bytes) else None
    image = _open_header(data, image_format) if image_format in ANIMATABLE else None
    if image is None or not is_animated(image):
        return None  # a still image, or one too large or damaged: the still decoding says how
    if len(data) > rule.max_bytes:
        raise ImageError(
            f"The animation is {len(data):,} bytes; the limit is {rule.max_bytes:,} bytes.", code="image.too_large"
        )
    if image.width * image.height > max_pixels:
        raise _too_many_pixels(image, max_pixels)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        sampled, duration = animation_frames(image, rule, sha256=sha256, max_pixels=max_pixels, convert=to_rgb)
    except ImageError:
        raise
    except Exception as error:  # Pillow raises many types for damaged frames
        raise _damaged(image_format, "animation") from error
    return _moving(data, sha256, image_format, "animation", sampled, duration, rule)


def _moving(data, sha256, media_format, kind, sampled, duration, rule) -> DecodedImage:
    first = sampled[0].image
    return DecodedImage(
        image=first, sha256=sha256, format=media_format, width=first.width, height=first.height, n_bytes=len(data),
        kind=kind, frames=sampled, duration_s=duration, frame_rule=rule.id,
    )  # fmt: skip


def _sniffed_or_none(data: bytes) -> str | None:
    try:
        return sniff_format(data)
    except ImageError:
        return None


def _open_header(data: bytes, image_format: str) -> Image.Image | None:
    """The image opened (its header read, no pixels), or None where Pillow refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=[image_format])
        except Exception:
            return None


def check_size(data: bytes, max_bytes: int) -> None:
    """Refuses an empty file, or one over `max_bytes`, before anything looks inside it."""
    if not data:
        raise ImageError("The file is empty (0 bytes).", code="image.empty")
    if len(data) > max_bytes:
        raise ImageError(f"The file is {len(data):,} bytes; the limit is {max_bytes:,} bytes.", code="image.too_large")


def sniff_format(data: bytes) -> str:
    """The format named by the file's magic number; the extension and any declared type are ignored."""
    for magic, offset, image_format in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            if image_format == "WEBP" and not data.startswith(b"RIFF"):
                continue
            return image_format
    head = data[:512].lstrip().lower()
    for magic, what in _LOOKALIKES:
        if head.startswith(magic.lower()) or (magic == b"<svg" and b"<svg" in head):
            raise ImageError(f"This is {what}, not an image.", code="image.unsupported_format")
    raise ImageError(
        f"Unrecognised file type; accepted formats are {', '.join(ALLOWED_FORMATS)}.",
        code="image.unsupported_format",
    )


def _open_checked(data: bytes, image_format: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=[image_format])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_many_pixels(None, max_pixels) from error
        except Exception as error:  # Pillow raises several types for a damaged header
            raise _damaged(image_format, "header") from error
        if image.width * image.height > max_pixels:
            raise _too_many_pixels(image, max_pixels)
        if image.width < 1 or image.height < 1:
            raise ImageError("The image has no pixels.", code="image.corrupt")
        try:
            image.load()  # frame 0: animated images are judged on their first frame
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_many_pixels(image, max_pixels) from error
        except OSError as error:
            if "truncated" in str(error).lower() or "broken data stream" in str(error).lower():
                raise ImageError(
                    f"The {image_format} file is truncated (incomplete upload?).", code="image.truncated"
                ) from error
            raise _damaged(image_format, "data") from error
        except Exception as error:
            raise _damaged(image_format, "data") from error
    return image


def _damaged(image_format: str, part: str) -> ImageError:
    # Pillow's own text can hold object addresses; a stable message serves logs and users better.
    return ImageError(f"The {image_format} {part} is damaged and cannot be decoded.", code="image.corrupt")


def _too_many_pixels(image: Image.Image | None, max_pixels: int) -> ImageError:
    if image is None:  # refused by Pillow's own bomb guard before the header reached us
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS)
        return ImageError(f"The image has more than {limit:,} pixels.", code="image.too_large")
    size = f"{image.width}x{image.height}"
    return ImageError(f"The image is {size} pixels; the limit is {max_pixels:,} pixels.", code="image.too_large")


def _orient(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF orientation; itself when it is upright (Pillow would copy it)."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception:
        return image  # a malformed EXIF block should not cost the image: keep it as stored


def to_rgb(image: Image.Image) -> Image.Image:
    """Every mode to 8-bit RGB, deterministically: alpha onto white, 16-bit and float scaled, not clipped."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    colour_keyed = mode in ("P", "L", "RGB") and "transparency" in image.info  # transparent palette entry or key
    if colour_keyed or mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, BACKGROUND)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    if image.mode == "RGB" and image.format == "JPEG":
        return image  # already what the stages take, a single frame: no copy (a megapixel costs ~1 ms of GIL)
    return image.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """High bit depth to 8 bits by the value range the depth implies (16-bit: /257; float: [0, 1])."""
    if pixels.dtype.kind == "f":
        return np.clip(np.nan_to_num(pixels) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    scaled = pixels.astype(np.float64) / 257.0 + 0.5
    return np.clip(scaled, 0, 255).astype(np.uint8)


class StageImage:
    """An image as the model stages see it (see `downscale`), with the factors that carry boxes between its
    pixels and the original's: stages work in its pixels, results report the original's.

    It holds its pixels as a Pillow image or as an (H, W, 3) uint8 tensor, and makes the other on first use only:
    copying pixels out of Pillow or into it holds the GIL (Pillow packs RGB as 4 bytes a pixel), which a worker's
    model thread then waits for (README, "Keeping a GPU busy")."""

    def __init__(self, image: Image.Image | None, scale_x: float = 1.0, scale_y: float = 1.0, pixels=None):
        if image is None and pixels is None:
            raise ValueError("A StageImage needs an image or its pixels.")
        self._image, self._pixels = image, pixels
        self.scale_x, self.scale_y = scale_x, scale_y  # original pixels per stage pixel, across and down

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = Image.fromarray(self._pixels.numpy(), "RGB")
        return self._image

    @property
    def pixels(self) -> torch.Tensor:
        """(H, W, 3) uint8 on the CPU."""
        if self._pixels is None:
            self._pixels = rgb_pixels(self._image)
        return self._pixels

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), from whichever form it holds."""
        if self._image is not None:
            return self._image.size
        return int(self._pixels.shape[1]), int(self._pixels.shape[0])

    def to_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in this image's pixels, in the original's, at the two decimals results report."""
        x0, y0, x1, y1 = box
        sx, sy = self.scale_x, self.scale_y
        return (round(x0 * sx, 2), round(y0 * sy, 2), round(x1 * sx, 2), round(y1 * sy, 2))

    def from_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in the original's pixels (a result, maybe a stored one), in this image's."""
        x0, y0, x1, y1 = box
        sx, sy = self.scale_x, self.scale_y
        return (x0 / sx, y0 / sy, x1 / sx, y1 / sy)


def rgb_pixels(image: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 pixels of an image (converted to RGB if it is not), one copy."""
    import torch

    return torch.from_numpy(np.array(image if image.mode == "RGB" else image.convert("RGB")))


def picture_size(picture) -> tuple[int, int]:
    """(width, height) of a Pillow image or of (H, W, 3) pixels."""
    if isinstance(picture, Image.Image):
        return picture.size
    return int(picture.shape[1]), int(picture.shape[0])


def picture_pixels(picture) -> torch.Tensor:
    """(H, W, 3) uint8 pixels of a Pillow image (one copy) or of pixels (themselves)."""
    return rgb_pixels(picture) if isinstance(picture, Image.Image) else picture


def downscale(image: Image.Image, max_side: int | None) -> StageImage:
    """`image` with its longer side brought down to `max_side`, aspect kept; an image within it is untouched
    (never upscaled: the stages' own processors do that, as before)."""
    if max_side is None or max(image.size) <= max_side:
        return StageImage(image)
    factor = max_side / max(image.size)
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return StageImage(None, image.width / size[0], image.height / size[1], pixels=_bicubic(image, size))


DOWNSCALE_FILTER = "bicubic-aa"  # in every stage version (`Detector.stage_versions`): other pixels, other artifacts


def _bicubic(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 of `image` at `size`: antialiased bicubic (Pillow's filter, as torchvision ports it) on the
    8-bit pixels. torchvision's uint8 kernel is vectorised: 3.9 ms a 1024×768 upload where Pillow's Lanczos took
    14.7 (`tests/bench/bench_host_prep.py`, README "Keeping a GPU busy"). It runs without the GIL; only the copy
    out of Pillow holds it."""
    from torchvision.transforms.v2 import functional

    pixels = rgb_pixels(image).permute(2, 0, 1)  # channels last in memory: the fast kernel's layout
    small = functional.resize(pixels, [size[1], size[0]], functional.InterpolationMode.BICUBIC, antialias=True)
    return small.permute(1, 2, 0).contiguous()


THUMBNAIL_QUALITY = 80  # JPEG quality of thumbnails: small files, artefacts a reviewer does not notice at that size
# Box-reduce by the largest whole factor that stays at or above the thumbnail's size, then bicubic for the rest:
# a few times cheaper than a fairer gap (about a millisecond for a 1024-pixel image), and a thumbnail only has
# to show a reviewer what was checked, not feed a model.
THUMBNAIL_REDUCING_GAP = 1.0


def thumbnail_jpeg(image: Image.Image, max_side: int) -> tuple[bytes, int, int]:
    """A baseline RGB JPEG of `image` with its longer side at most `max_side` (aspect kept, never upscaled), and
    its width and height. Its size is bounded by its pixels, whatever the original's; no metadata is carried."""
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, not {max_side}")
    if image.mode != "RGB":
        image = to_rgb(image)
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=THUMBNAIL_REDUCING_GAP)
    buffer = io.BytesIO()
    # Pillow carries the original's JPEG comment over unless told not to: an upload's text stays with the upload.
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY, comment=b"")
    return buffer.getvalue(), image.width, image.height


def letterbox(image: Image.Image) -> Image.Image:
    """Pads to a square at the bottom/right, so relative box coordinates scale back with one factor."""
    if image.width == image.height:
        return image
    side = max(image.width, image.height)
    canvas = Image.new("RGB", (side, side), PAD_COLOR)
    canvas.paste(image, (0, 0))
    return canvas
