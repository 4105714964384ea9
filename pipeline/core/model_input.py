"""A model's pixel input made in two halves: resized on the host, rescaled and normalised on the model's device.

The image processors of transformers do all of it on the host in float32: at Grounding DINO's 800-pixel canvas
that is ~2 million floats per image written, normalised and copied (17.6 ms of CPU per image against 1.7 here,
`tests/bench/bench_host_prep.py`, README "Keeping a GPU busy"), and four times the bytes to copy to the GPU. Here
the host only resizes (uint8, releasing the GIL) and hands
over uint8 pixels; the arithmetic, a few elementwise operations, runs on the device. The numbers (size, filter,
rescale factor, mean, std) are the processor's own, read from the model folder. Resizing uses torchvision's
8-bit antialiased kernels (Pillow's filters, ported and vectorised); against the processors' own float path a
pixel may differ by a level, which is why the stages that switched to this bumped their `implementation` (their
artifacts are new versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional

from pipeline.core.imaging import picture_pixels


@dataclass(frozen=True)
class PixelRecipe:
    size: tuple[int, int]  # (width, height) every image is resized to
    resample: Image.Resampling
    scale: float  # the rescale factor (1/255), 1.0 when the processor does not rescale
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, processor, size: tuple[int, int] | None = None) -> PixelRecipe:
        """The recipe of a transformers image processor; `size` overrides its own (a grounder's canvas)."""
        if size is None:
            own = processor.size
            size = (int(own["width"]), int(own["height"]))
        normalise = getattr(processor, "do_normalize", True)
        return cls(
            size=size,
            resample=Image.Resampling(int(processor.resample)),
            scale=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0,
            mean=tuple(processor.image_mean) if normalise else (0.0, 0.0, 0.0),
            std=tuple(processor.image_std) if normalise else (1.0, 1.0, 1.0),
        )

    def host(self, pictures: list, pinned: bool = False) -> torch.Tensor:
        """(B, H, W, 3) uint8: each picture (a Pillow image or (H, W, 3) pixels) resized to `size`, written straight
        into one batch tensor."""
        width, height = self.size
        batch = torch.empty((len(pictures), height, width, 3), dtype=torch.uint8, pin_memory=pinned)
        for row, picture in enumerate(pictures):
            batch[row] = self._resized(picture_pixels(picture))
        return batch

    def letterboxed(self, pictures: list, pad: tuple[int, int, int], pinned: bool = False) -> torch.Tensor:
        """(B, H, W, 3) uint8 of square `size`: each picture padded at the bottom and right to a square of its longer
        side in colour `pad`, then resized to `size` (`pipeline.core.imaging.letterbox`). A picture whose longer
        side is the canvas already (the detector downscaled it there) is only copied into its padded slot."""
        width, height = self.size
        batch = torch.empty((len(pictures), height, width, 3), dtype=torch.uint8, pin_memory=pinned)
        colour = torch.tensor(pad, dtype=torch.uint8)
        for row, picture in enumerate(pictures):
            pixels = picture_pixels(picture)
            rows, columns = pixels.shape[:2]
            side = max(rows, columns)
            if side != width or width != height:
                square = torch.empty((side, side, 3), dtype=torch.uint8)
                square[:rows, :columns], square[rows:, :], square[:rows, columns:] = pixels, colour, colour
                batch[row] = self._resized(square)
                continue
            slot = batch[row]  # the picture, then padding below and to its right: each byte written once
            slot[:rows, :columns], slot[rows:, :], slot[:rows, columns:] = pixels, colour, colour
        return batch

    def on_device(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`host`'s pixels as the model takes them: (B, 3, H, W), rescaled and normalised, on `device`."""
        values = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return ((values * self.scale - mean) / std).to(dtype)

    def _resized(self, pixels: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 at `size`: antialiased as Pillow's filters are (torchvision's port, vectorised for
        8-bit pixels in this channels-last layout)."""
        width, height = self.size
        if tuple(pixels.shape[:2]) == (height, width):
            return pixels
        mode = _MODES.get(self.resample)
        if mode is None:  # a filter torchvision does not port: Pillow's own
            image = Image.fromarray(pixels.numpy(), "RGB").resize(self.size, self.resample)
            return torch.from_numpy(np.array(image))
        resized = functional.resize(pixels.permute(2, 0, 1), [height, width], mode, antialias=True)
        return resized.permute(1, 2, 0)


_MODES = {
    Image.Resampling.BICUBIC: functional.InterpolationMode.BICUBIC,
    Image.Resampling.BILINEAR: functional.InterpolationMode.BILINEAR,
    Image.Resampling.NEAREST: functional.InterpolationMode.NEAREST,
}
