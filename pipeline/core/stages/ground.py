"""Ground: find each object phrase of the caption in the image (Grounding DINO, standing in for GLIP-L).

Decisions the paper leaves open, made here:
- Every image is letterboxed onto a square canvas (padded bottom/right with the normalisation mean) before
  the processor resizes it. All images of a batch then share one size, so no image is padded to fit a
  larger neighbour: an image's boxes do not depend on what else was in its batch. Boxes are in the pixels of
  the image the stage is given; in the detector that image is downscaled to the canvas side at most, and the
  detector maps the boxes back to the original.
- A phrase's score for a box is the highest token probability over that phrase's tokens; each phrase keeps
  its best box if that score reaches `box_threshold`; at most `max_objects` are kept, by score.
"""

from __future__ import annotations

import torch
from PIL import Image

from pipeline.core.devices import compute_precision
from pipeline.core.imaging import letterbox
from pipeline.core.model_store import LocatedModel
from pipeline.core.results import GroundedObject
from pipeline.core.stages.base import Stage


class Grounder(Stage):
    name = "ground"
    default_batch_size = 16  # 900 queries over ~13k image tokens at the 800-pixel canvas: activations dominate
    # TF32 on CUDA (fp32 on a CPU): see the README's "Precision" for the figures behind the choice.
    default_precision = "tf32"

    def _load(self) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.located.path)
        # fp32 weights: scores are thresholded, and a score moved across the threshold changes the objects.
        model = AutoModelForZeroShotObjectDetection.from_pretrained(self.located.path)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def ground(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[GroundedObject]]:
        """The objects found for each (image, phrases) pair; an image with no phrases skips the model."""
        results: list[list[GroundedObject]] = [[] for _ in images]
        todo = [index for index, image_phrases in enumerate(phrases) if image_phrases]
        if not todo:
            return results
        self.load()
        found = self.in_runs(todo, lambda part: self._ground([images[i] for i in part], [phrases[i] for i in part]))
        for index, objects in zip(todo, found, strict=True):
            results[index] = objects
        return results

    @property
    def input_side(self) -> int:
        """The canvas side: the letterboxed image is resized to a square of it, whatever its size."""
        return int(self.params["canvas"])

    def _ground(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[GroundedObject]]:
        canvas = int(self.params["canvas"])
        canvases = [letterbox(image) for image in images]
        prompts = [_prompt(image_phrases) for image_phrases in phrases]
        inputs = self.processor(
            images=canvases,
            text=[text for text, _ in prompts],
            return_tensors="pt",
            padding=True,
            return_offsets_mapping=True,
            size={"shortest_edge": canvas, "longest_edge": canvas},
        )
        offsets = inputs.pop("offset_mapping")
        with compute_precision(self.precision, self.device):  # fp32 weights; tf32 or autocast when asked
            outputs = self.model(**{key: value.to(self.device) for key, value in inputs.items()})
        probabilities = outputs.logits.float().sigmoid().cpu()
        boxes = outputs.pred_boxes.float().cpu()
        found = []
        for row, image in enumerate(images):
            token_phrase = _token_phrases(offsets[row], inputs["attention_mask"][row], prompts[row][1])
            found.append(self._pick(probabilities[row], boxes[row], token_phrase, phrases[row], image))
        return found

    def _pick(
        self,
        probabilities: torch.Tensor,  # (queries, text tokens)
        boxes: torch.Tensor,  # (queries, 4), cx cy w h relative to the square canvas
        token_phrase: list[int],
        image_phrases: list[str],
        image: Image.Image,
    ) -> list[GroundedObject]:
        side = max(image.width, image.height)
        found = []
        for phrase_index, phrase in enumerate(image_phrases):
            tokens = [t for t, p in enumerate(token_phrase) if p == phrase_index and t < probabilities.shape[-1]]
            if not tokens:
                continue  # the phrase was truncated away by the model's text length
            per_query = probabilities[:, tokens].max(dim=1).values
            best = int(per_query.argmax())
            score = float(per_query[best])
            box = _to_pixels(boxes[best], side, image.width, image.height)
            if score >= self.params["box_threshold"] and box is not None:
                found.append(GroundedObject(phrase, box, score))
        found.sort(key=lambda obj: obj.score, reverse=True)
        return found[: self.params["max_objects"]]


def _prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's prompt format, "phrase one. phrase two.", with each phrase's character span."""
    text, spans = "", []
    for phrase in phrases:
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + ". "
    return text.strip(), spans


def _token_phrases(offsets: torch.Tensor, attention: torch.Tensor, spans: list[tuple[int, int]]) -> list[int]:
    """For each token, the index of the phrase it belongs to, or -1 (special tokens, dots, padding)."""
    owners = []
    for (start, end), attended in zip(offsets.tolist(), attention.tolist(), strict=True):
        owner = -1
        if attended and end > start:
            owner = next((i for i, (s, e) in enumerate(spans) if s <= start and end <= e), -1)
        owners.append(owner)
    return owners


def _to_pixels(box: torch.Tensor, side: int, width: int, height: int):
    """(cx, cy, w, h) relative to the square canvas → clamped (x0, y0, x1, y1) in image pixels."""
    cx, cy, w, h = (float(v) * side for v in box)
    x0, x1 = max(0.0, cx - w / 2), min(float(width), cx + w / 2)
    y0, y1 = max(0.0, cy - h / 2), min(float(height), cy + h / 2)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None  # the box lies in the padding, or is under a pixel: nothing to crop
    return (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2))


class WholeImageGrounder(Stage):
    """Grounding turned off (an ablation): every phrase is placed on the whole image, with full confidence.

    The local misalignment then compares each object phrase with the whole picture, so the difference to the
    real grounder measures what localisation adds, rather than what the phrases add.
    """

    name = "ground"
    default_precision = None

    def _load(self) -> None:
        """Nothing to load: this stage runs no model."""

    @property
    def input_side(self) -> int | None:
        """The canvas of the grounder this stands in for (`with_models` keeps it): no model looks at it, but it
        keeps the side images are downscaled to, and with it the other stages' inputs."""
        canvas = self.params.get("canvas")
        return int(canvas) if canvas else None

    def ground(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[GroundedObject]]:
        limit = int(self.params["max_objects"])
        found = []
        for image, wanted in zip(images, phrases, strict=True):
            whole = (0.0, 0.0, float(image.width), float(image.height))
            found.append([GroundedObject(phrase, whole, 1.0) for phrase in wanted[:limit]])
        return found


def make_grounder(
    located: LocatedModel, device: torch.device, precision: str | None = None
) -> Grounder | WholeImageGrounder:
    """The grounding stage for a model spec: Grounding DINO, or the whole-image stand-in when grounding is off."""
    return Grounder(located, device, precision) if located.spec.weights else WholeImageGrounder(located, device)
