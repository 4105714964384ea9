"""CLIP's input pictures, cut and preprocessed as tensors on the embedder's device.

Each image becomes one uint8 tensor; the whole image and every object's square crop are sliced from it, and
open_clip's eval transform (resize, center-crop, normalise) is redone in torch, so a batch of crops costs a few
tensor operations instead of a PIL crop, paste and resize per crop. The arithmetic follows the PIL path it
replaces: torchvision's output sizes and crop offsets, Pillow's antialiased filter (`antialias=True` is
PyTorch's port of it) and its rounding to 8 bits after each resize pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from pipeline.core.imaging import PAD_COLOR, picture_pixels

Box = tuple[float, float, float, float]
_RESIZE_MODES = ("shortest", "squash")  # what open_clip's eval transform supports that we reproduce
_FILTERS = ("bicubic", "bilinear")


def host_pixels(picture, pinned: bool = False) -> torch.Tensor:
    """The (H, W, 3) uint8 pixels of a Pillow image or of pixels, on the CPU; `pinned` (page-locked, a copy) so
    that the copy to a CUDA device is asynchronous."""
    pixels = picture_pixels(picture)
    return pixels.pin_memory() if pinned else pixels


def on_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host_pixels` as the (3, H, W) tensor on `device` that all of the image's pictures are cut from."""
    return pixels.to(device, non_blocking=True).permute(2, 0, 1)


def image_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """The (3, H, W) uint8 copy of an RGB image on `device` that all of its pictures are cut from."""
    return on_device(host_pixels(image), device)


def square_crop(pixels: torch.Tensor, box: Box) -> torch.Tensor:
    """The box region of (3, H, W) `pixels`, centred on a PAD_COLOR square, so CLIP's center-crop keeps the whole
    object. Corners are rounded to whole pixels and a box is at least one pixel wide and high; a part of the box
    outside the image is padding too."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    side = max(x1 - x0, y1 - y0)
    canvas = torch.empty((3, side, side), dtype=pixels.dtype, device=pixels.device)
    for channel, value in enumerate(PAD_COLOR):
        canvas[channel] = value
    # Where image pixel (0, 0) lands on the canvas: the box is centred, rounding down like Pillow's paste offset.
    left, top = (side - (x1 - x0)) // 2 - x0, (side - (y1 - y0)) // 2 - y0
    height, width = pixels.shape[-2:]
    inside_x0, inside_y0, inside_x1, inside_y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if inside_x0 < inside_x1 and inside_y0 < inside_y1:
        canvas[:, inside_y0 + top : inside_y1 + top, inside_x0 + left : inside_x1 + left] = pixels[
            :, inside_y0:inside_y1, inside_x0:inside_x1
        ]
    return canvas


@dataclass(frozen=True)
class ClipTransform:
    """open_clip's eval transform for one model, on tensors: `model.visual.preprocess_cfg` says which."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def of(cls, model) -> ClipTransform:
        config = model.visual.preprocess_cfg
        size = config["size"]
        height, width = (size, size) if isinstance(size, int) else size
        transform = cls(
            height, tuple(config["mean"]), tuple(config["std"]), config["interpolation"], config["resize_mode"]
        )
        if height != width or transform.resize_mode not in _RESIZE_MODES or transform.interpolation not in _FILTERS:
            raise ValueError(
                f"Unsupported CLIP preprocessing {config}: expected a square size, resize_mode in {_RESIZE_MODES} "
                f"and interpolation in {_FILTERS}."
            )
        return transform

    def __call__(self, pictures: list[torch.Tensor]) -> torch.Tensor:
        """(n, 3, size, size) float32, normalised, from uint8 (3, h, w) pictures of any sizes."""
        batch = torch.stack([self._center_crop(self._resize(picture)) for picture in pictures])
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch / 255.0 - mean) / std

    def _resize(self, picture: torch.Tensor) -> torch.Tensor:
        """To the model's size (shortest side, or both sides for `squash`), as float holding 8-bit values.

        Pillow resizes across, then down, and stores 8-bit pixels after each pass; so does this (the filter's
        overshoot on sharp edges is clipped in between), which keeps it within a level or so of Pillow's result.
        """
        height, width = picture.shape[-2:]
        new_height, new_width = self._resized_size(height, width)
        resized = picture[None].float()
        for size in ((height, new_width), (new_height, new_width)):
            if size != tuple(resized.shape[-2:]):
                resized = torch.nn.functional.interpolate(
                    resized, size=size, mode=self.interpolation, antialias=True, align_corners=False
                )
                resized = resized.clamp_(0, 255).round_()
        return resized[0]

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_mode == "squash":
            return self.size, self.size
        # torchvision's Resize(int): the shorter side to `size`, the longer one scaled and truncated.
        if width <= height:
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def _center_crop(self, picture: torch.Tensor) -> torch.Tensor:
        height, width = picture.shape[-2:]
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        return picture[:, top : top + self.size, left : left + self.size]
