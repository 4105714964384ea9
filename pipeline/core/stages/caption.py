"""Caption: image → one sentence, with a BLIP-family image-to-text model (paper: BLIP-2 OPT-2.7b)."""

from __future__ import annotations

import json

import torch

from pipeline.core.devices import compute_precision, weight_dtype
from pipeline.core.errors import ModelLoadError
from pipeline.core.imaging import Picture
from pipeline.core.model_input import PixelRecipe
from pipeline.core.stages.base import Stage

# Parameters passed through to `generate`; anything else in the spec's params is ours.
_GENERATE_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty")
# Where a model folder keeps its image processor's settings: the hub's layout, then the one transformers 5 saves
# (the image processor's settings inside the processor's, as the generated models have it).
_PROCESSOR_FILES = (("preprocessor_config.json", None), ("processor_config.json", "image_processor"))
_SIZE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


class Captioner(Stage):
    name = "caption"
    # fp16 on CUDA: BLIP-2 is published for it and greedy decoding rarely flips a token over it (fp32 on a CPU).
    default_precision = "fp16"
    # 2: resized in uint8 on the host (torchvision), rescaled and normalised on the device
    # (pipeline.core.model_input), rather than in float32 by the processor on the host: a pixel may differ by a level.
    implementation = 2

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.dtype = weight_dtype(self.precision)  # half precisions load half weights; tf32 keeps float32
        self.processor = AutoProcessor.from_pretrained(self.located.path)
        self.recipe = PixelRecipe.of(self.processor.image_processor)
        model = AutoModelForImageTextToText.from_pretrained(self.located.path, dtype=self.dtype)
        self.model = model.to(self.device).eval()

    def prepare(self, images: list[Picture]) -> torch.Tensor:
        """Each image resized to the processor's square, as uint8 (B, H, W, 3) on the CPU: the host's share of the
        input, done for the next batch while the device runs this one (pinned on CUDA, so the copy is async).
        Rescaling and normalising happen on the device (`pipeline.core.model_input`)."""
        self.load()
        return self.recipe.host(images, pinned=self.device.type == "cuda")

    @torch.inference_mode()
    def caption(self, images: list[Picture], prepared: torch.Tensor | None = None) -> list[str]:
        """Deterministic (greedy or beam) captions, one per image, in order, `batch_size` images per `generate`;
        `prepared` is `prepare(images)` when it was done ahead."""
        if not images:
            return []
        pixels = self.prepare(images) if prepared is None else prepared
        return self.in_runs(list(range(len(images))), lambda part: self._describe(pixels[part[0] : part[-1] + 1]))

    def _describe(self, pixels: torch.Tensor) -> list[str]:
        ids = self._generate_ids(self._bucketed(pixels))[: len(pixels)]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]

    def _bucketed(self, pixels: torch.Tensor) -> torch.Tensor:
        """With a static cache, a partial run is padded (with copies of its last image) to the next power of two,
        at most the batch size: the compiled decoder then sees a few fixed shapes and never recompiles for an odd
        one. The copies' captions are dropped."""
        if not self.params.get("static_cache") or len(pixels) == 0:
            return pixels
        bucket = min(self.batch_size, 1 << (len(pixels) - 1).bit_length())  # never above a size halved for memory
        if bucket <= len(pixels):
            return pixels
        return torch.cat([pixels, pixels[-1:].expand(bucket - len(pixels), *pixels.shape[1:])])

    def _generate_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model: token ids of each image's caption (the simulated device replaces this)."""
        pixel_values = self.recipe.on_device(pixels, self.device, self.dtype)
        settings = {key: self.params[key] for key in _GENERATE_KEYS if key in self.params}
        if self.params.get("static_cache"):
            # A fixed-size KV cache: on CUDA, transformers then compiles the decoder step (CUDA graphs).
            settings["cache_implementation"] = "static"
        with compute_precision("tf32" if self.precision == "tf32" else "fp32", self.device):
            return self.model.generate(pixel_values=pixel_values, do_sample=False, **settings)

    @property
    def input_side(self) -> int:
        """The side the image processor resizes to (BLIP: a fixed square), read from the model folder."""
        for name, section in _PROCESSOR_FILES:
            path = self.located.path / name
            if not path.is_file():
                continue
            try:
                config = json.loads(path.read_text())
                size = (config[section] if section else config)["size"]
                return int(size) if isinstance(size, int) else max(int(size[k]) for k in _SIZE_KEYS if size.get(k))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelLoadError(f"Could not read the image size from {path}: {error}") from error
        raise ModelLoadError(f"{self.located.path} has no image processor settings ({_PROCESSOR_FILES[0][0]}).")
