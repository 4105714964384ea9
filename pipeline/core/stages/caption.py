"""Caption: image → one sentence, with a BLIP-family image-to-text model (paper: BLIP-2 OPT-2.7b)."""

from __future__ import annotations

import json

import torch
from PIL import Image

from pipeline.core.devices import compute_precision, weight_dtype
from pipeline.core.errors import ModelLoadError
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

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.dtype = weight_dtype(self.precision)  # half precisions load half weights; tf32 keeps float32
        self.processor = AutoProcessor.from_pretrained(self.located.path)
        model = AutoModelForImageTextToText.from_pretrained(self.located.path, dtype=self.dtype)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """Deterministic (greedy or beam) captions, one per image, in order, `batch_size` images per `generate`."""
        if not images:
            return []
        self.load()
        return self.in_runs(images, self._generate)

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

    def _generate(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        settings = {key: self.params[key] for key in _GENERATE_KEYS if key in self.params}
        if self.params.get("static_cache"):
            # A fixed-size KV cache: on CUDA, transformers then compiles the decoder step (CUDA graphs).
            settings["cache_implementation"] = "static"
        with compute_precision("tf32" if self.precision == "tf32" else "fp32", self.device):
            generated = self.model.generate(pixel_values=pixel_values, do_sample=False, **settings)
        texts = self.processor.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]
