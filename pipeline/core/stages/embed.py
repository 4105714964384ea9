"""Embed: images and texts into CLIP's joint space with open_clip (paper: ViT-L/14, OpenAI weights).

An image and its objects' square crops are cut from one tensor of the image on the device and preprocessed there
(`pipeline.core.clip_input`), in batches of `batch_size` pictures.
"""

from __future__ import annotations

import json

import torch

from pipeline.core.clip_input import Box, ClipTransform, host_pixels, on_device, square_crop
from pipeline.core.devices import compute_precision
from pipeline.core.errors import ModelLoadError
from pipeline.core.imaging import Picture
from pipeline.core.stages.base import Stage

CONFIG_FILE = "open_clip_config.json"  # what open_clip's `local-dir:` loader reads; every CLIP folder has one
TOKEN_CACHE = 50_000  # distinct texts whose tokens a process keeps (~0.6 KB each: 77 int64)


class Embedder(Stage):
    name = "embed"
    default_precision = "tf32"  # on CUDA (fp32 on a CPU): README, "Precision"
    # 2: crops and preprocessing as tensors (`clip_input`), from images the detector downscaled first; the
    # part of a box outside the image is padded with PAD_COLOR (Pillow's crop filled it with black).
    implementation = 2

    def _load(self) -> None:
        import open_clip

        source = f"local-dir:{self.located.path}"
        # fp32 weights even on CUDA: D is a small difference of unit vectors, and fp16 embeddings visibly move it;
        # tf32 or bf16 autocast only when the stage's precision asks for it.
        model, _, _ = open_clip.create_model_and_transforms(
            source, force_quick_gelu=bool(self.params.get("quick_gelu")), device=self.device
        )
        self.model = model.eval()
        self.transform = ClipTransform.of(model)  # the model's own eval transform (`preprocess`), on tensors
        self.tokenizer = open_clip.get_tokenizer(source)
        self._token_cache: dict[str, torch.Tensor] = {}

    def prepare(self, images: list[Picture]) -> list[torch.Tensor]:
        """Each image as a (H, W, 3) uint8 tensor on the CPU, which its pictures are cut from on the device: the
        host's share of CLIP's input, done for the next batch while the device runs this one (pinned on CUDA)."""
        pinned = self.device.type == "cuda"
        return [host_pixels(image, pinned) for image in images]

    @torch.inference_mode()
    def embed_images(
        self,
        images: list[Picture],
        boxes: list[list[Box]] | None = None,
        prepared: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Unnormalised embeddings of each image followed by the square crops of its `boxes` (in its pixels):
        float32 on the CPU, shape (len(images) + number of boxes, d), rows in that order. `prepared` is
        `prepare(images)` when it was done ahead."""
        self.load()
        boxes = boxes if boxes is not None else [[] for _ in images]
        host = self.prepare(images) if prepared is None else prepared
        # One copy per image, every crop cut from it on the device.
        pixels = [on_device(pixel, self.device) for pixel in host]
        pictures = [(whole, box) for whole, own in zip(pixels, boxes, strict=True) for box in (None, *own)]
        parts = self.in_runs(pictures, lambda part: [self._encode_pictures(part)])
        return _concat(parts, self.dim)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings (truncated to the model's context), float32 on the CPU."""
        self.load()
        parts = self.in_runs(texts, lambda part: [self._encode_texts(self._tokens(part))])
        return _concat(parts, self.dim)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), context) token ids. open_clip's tokenizer is Python (text cleaning, BPE), ~0.1 ms a text on
        the model thread while the device waits; object phrases repeat across uploads ("man", "red car"), so each
        distinct text is tokenized once per process, up to TOKEN_CACHE texts."""
        return torch.cat([self._token_row(text) for text in texts])

    def _token_row(self, text: str) -> torch.Tensor:
        row = self._token_cache.get(text)
        if row is None:
            row = self.tokenizer([text])
            if len(self._token_cache) >= TOKEN_CACHE:
                self._token_cache.pop(next(iter(self._token_cache)))  # the oldest: plain FIFO is enough here
            self._token_cache[text] = row
        return row

    def _encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower on tokenised texts (the simulated device replaces this)."""
        with compute_precision(self.precision, self.device):
            return self.model.encode_text(tokens.to(self.device, non_blocking=True))

    def _encode_pictures(self, pictures: list[tuple[torch.Tensor, Box | None]]) -> torch.Tensor:
        """One model call for (image tensor, box or None for the whole image) pairs (the simulated device
        replaces this)."""
        batch = self.transform([whole if box is None else square_crop(whole, box) for whole, box in pictures])
        with compute_precision(self.precision, self.device):  # the model's products only: inputs stay float32
            return self.model.encode_image(batch)

    @property
    def input_side(self) -> int:
        """CLIP's input size, read from the model folder's config: asking loads no model."""
        size = self._from_config("input size", lambda config: config["model_cfg"]["vision_cfg"]["image_size"])
        return int(max(size) if isinstance(size, (list, tuple)) else size)

    @property
    def dim(self) -> int:
        """The embedding width, read from the model folder's config: asking loads no model."""
        if self.loaded:
            return int(self.model.visual.output_dim)
        return int(self._from_config("embedding width", lambda config: config["model_cfg"]["embed_dim"]))

    def _from_config(self, what: str, pick):
        config_path = self.located.path / CONFIG_FILE
        try:
            return pick(json.loads(config_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"Could not read the {what} from {config_path}: {error}") from error


def _concat(chunks: list[torch.Tensor], dim: int) -> torch.Tensor:
    if not chunks:
        return torch.empty(0, dim)
    return torch.cat(chunks).float().cpu()
