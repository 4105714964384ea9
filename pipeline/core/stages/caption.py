"""Caption: image → one sentence, with a BLIP-family image-to-text model (paper: BLIP-2 OPT-2.7b)."""

from __future__ import annotations

import torch
from PIL import Image

from pipeline.core.devices import compute_precision, weight_dtype
from pipeline.core.stages.base import Stage

# Parameters passed through to `generate`; anything else in the spec's params is ours.
_GENERATE_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty")


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
