"""Embed: images and texts into CLIP's joint space with open_clip (paper: ViT-L/14, OpenAI weights)."""

from __future__ import annotations

import json

import torch
from PIL import Image

from pipeline.core.devices import compute_precision
from pipeline.core.errors import ModelLoadError
from pipeline.core.stages.base import Stage

CONFIG_FILE = "open_clip_config.json"  # what open_clip's `local-dir:` loader reads; every CLIP folder has one


class Embedder(Stage):
    name = "embed"
    default_precision = "tf32"  # on CUDA (fp32 on a CPU): README, "Precision"

    def _load(self) -> None:
        import open_clip

        source = f"local-dir:{self.located.path}"
        # fp32 weights even on CUDA: D is a small difference of unit vectors, and fp16 embeddings visibly move it;
        # tf32 or bf16 autocast only when the stage's precision asks for it.
        model, _, preprocess = open_clip.create_model_and_transforms(
            source, force_quick_gelu=bool(self.params.get("quick_gelu")), device=self.device
        )
        self.model = model.eval()
        self.preprocess = preprocess  # the model's own eval transform: resize, center-crop, normalise
        self.tokenizer = open_clip.get_tokenizer(source)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unnormalised image embeddings, float32 on the CPU, shape (len(images), d)."""
        self.load()
        with compute_precision(self.precision, self.device):
            parts = self.in_runs(images, lambda part: [self._encode_images(part)])
        return _concat(parts, self.dim)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings (truncated to the model's context), float32 on the CPU."""
        self.load()
        with compute_precision(self.precision, self.device):
            parts = self.in_runs(texts, lambda part: [self.model.encode_text(self.tokenizer(part).to(self.device))])
        return _concat(parts, self.dim)

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.model.encode_image(torch.stack([self.preprocess(image) for image in images]).to(self.device))

    @property
    def dim(self) -> int:
        """The embedding width, read from the model folder's config: asking loads no model."""
        if self.loaded:
            return int(self.model.visual.output_dim)
        try:
            config = json.loads((self.located.path / CONFIG_FILE).read_text())
            return int(config["model_cfg"]["embed_dim"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            config_path = self.located.path / CONFIG_FILE
            raise ModelLoadError(f"Could not read the embedding width from {config_path}: {error}") from error


def _concat(chunks: list[torch.Tensor], dim: int) -> torch.Tensor:
    if not chunks:
        return torch.empty(0, dim)
    return torch.cat(chunks).float().cpu()
