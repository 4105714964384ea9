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

from pipeline.core.devices import compute_precision
from pipeline.core.imaging import PAD_COLOR, Picture, picture_size
from pipeline.core.model_input import PixelRecipe
from pipeline.core.model_store import LocatedModel
from pipeline.core.results import GroundedObject
from pipeline.core.stages.base import Stage


class Grounder(Stage):
    name = "ground"
    default_batch_size = 16  # 900 queries over ~13k image tokens at the 800-pixel canvas: activations dominate
    # TF32 on CUDA (fp32 on a CPU): see the README's "Precision" for the figures behind the choice.
    default_precision = "tf32"
    # 2: resized in uint8 on the host (torchvision), rescaled and normalised on the device
    # (pipeline.core.model_input), rather than in float32 by the processor on the host; each phrase's best query
    # picked on the device.
    implementation = 2

    def _load(self) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.located.path)
        canvas = int(self.params["canvas"])
        self.recipe = PixelRecipe.of(self.processor.image_processor, size=(canvas, canvas))
        # fp32 weights: scores are thresholded, and a score moved across the threshold changes the objects.
        model = AutoModelForZeroShotObjectDetection.from_pretrained(self.located.path)
        self.model = model.to(self.device).eval()
        self.max_text_len = int(model.config.max_text_len)

    def prepare(self, images: list[Picture]) -> torch.Tensor:
        """Each image letterboxed and resized to the canvas, as uint8 (B, canvas, canvas, 3) on the CPU: the host's
        share of the input, done for the next batch while the device runs this one (pinned on CUDA). Rescaling
        and normalising happen on the device (`pipeline.core.model_input`)."""
        self.load()
        return self.recipe.letterboxed(images, PAD_COLOR, pinned=self.device.type == "cuda")

    @torch.inference_mode()
    def ground(
        self, images: list[Picture], phrases: list[list[str]], prepared: torch.Tensor | None = None
    ) -> list[list[GroundedObject]]:
        """The objects found for each (image, phrases) pair; an image with no phrases skips the model. `prepared`
        is `prepare(images)` when it was done ahead."""
        results: list[list[GroundedObject]] = [[] for _ in images]
        todo = [index for index, image_phrases in enumerate(phrases) if image_phrases]
        if not todo:
            return results
        pixels = self._pixels_of(images, todo, prepared)

        def run(part: list[int]) -> list[list[GroundedObject]]:
            rows = pixels[part[0] : part[-1] + 1]
            return self._ground(rows, [images[todo[i]] for i in part], [phrases[todo[i]] for i in part])

        for index, objects in zip(todo, self.in_runs(list(range(len(todo))), run), strict=True):
            results[index] = objects
        return results

    def _pixels_of(self, images, todo: list[int], prepared: torch.Tensor | None) -> torch.Tensor:
        if prepared is None:
            return self.prepare([images[i] for i in todo])
        if len(todo) == len(images):
            return prepared
        return prepared[torch.tensor(todo)]  # a caption without objects: its image is left out (a copy of the rest)

    @property
    def input_side(self) -> int:
        """The canvas side: the letterboxed image is resized to a square of it, whatever its size."""
        return int(self.params["canvas"])

    def _ground(
        self, pixels: torch.Tensor, images: list[Picture], phrases: list[list[str]]
    ) -> list[list[GroundedObject]]:
        prompts = [_prompt(image_phrases) for image_phrases in phrases]
        text = self.processor.tokenizer(
            [prompt for prompt, _ in prompts],
            padding=True,
            truncation=True,  # the model reads max_text_len tokens: phrases past it get no tokens, and no box
            max_length=self.max_text_len,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        offsets = text.pop("offset_mapping")
        owners = _phrase_tokens(offsets, text["attention_mask"], [spans for _, spans in prompts])
        scores, boxes, found = (t.tolist() for t in self._best_boxes(pixels, dict(text), owners))
        return [
            self._objects(scores[row], boxes[row], found[row], phrases[row], image) for row, image in enumerate(images)
        ]

    def _best_boxes(
        self, pixels: torch.Tensor, text: dict[str, torch.Tensor], owners: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model, and each phrase's best query picked on the device: for phrase p of image b, its score (the
        highest probability over its tokens, at the query where that is highest), that query's box (cx, cy, w, h
        relative to the canvas), and whether the phrase kept any token within the model's text length. Only these
        (B, phrases) figures come back to the CPU, not the (B, 900, 256) logits. `owners` (B, phrases, tokens)
        says which tokens make up each phrase (the simulated device replaces this method)."""
        device = self.device
        inputs = {key: value.to(device, non_blocking=True) for key, value in text.items()}
        inputs["pixel_values"] = self.recipe.on_device(pixels, device, torch.float32)
        # Every image fills its canvas (letterboxed, all of one size): no padding to mask.
        inputs["pixel_mask"] = torch.ones(pixels.shape[:3], dtype=torch.long, device=device)
        with compute_precision(self.precision, device):  # fp32 weights; tf32 or autocast when asked
            outputs = self.model(**inputs)
        probabilities = outputs.logits.float().sigmoid()  # (B, queries, model text length)
        length = probabilities.shape[-1]
        owners = owners[..., :length].to(device, non_blocking=True)  # tokens past the text length were cut
        owners = torch.nn.functional.pad(owners, (0, length - owners.shape[-1]))
        per_query = (probabilities.unsqueeze(1) * owners.unsqueeze(2)).amax(-1)  # (B, phrases, queries); > 0 if owned
        best = per_query.argmax(-1, keepdim=True)  # the first of equal maxima, as on the CPU
        scores = per_query.gather(-1, best).squeeze(-1)
        boxes = outputs.pred_boxes.float().gather(1, best.expand(-1, -1, 4))
        return scores.cpu(), boxes.cpu(), owners.any(-1).cpu()

    def _objects(
        self, scores: list[float], boxes: list[list[float]], found: list[bool], image_phrases: list[str], image
    ) -> list[GroundedObject]:
        """Each phrase's best box in image pixels, kept if its score reaches `box_threshold`; the best
        `max_objects` of them by score."""
        width, height = picture_size(image)
        kept = []
        for phrase, score, box, has_tokens in zip(image_phrases, scores, boxes, found, strict=False):
            pixels = _to_pixels(box, max(width, height), width, height) if has_tokens else None
            if pixels is not None and score >= self.params["box_threshold"]:
                kept.append(GroundedObject(phrase, pixels, score))
        kept.sort(key=lambda obj: obj.score, reverse=True)
        return kept[: self.params["max_objects"]]


def _prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's prompt format, "phrase one. phrase two.", with each phrase's character span."""
    text, spans = "", []
    for phrase in phrases:
        spans.append((len(text), len(text) + len(phrase)))
        text += phrase + ". "
    return text.strip(), spans


def _phrase_tokens(offsets: torch.Tensor, attention: torch.Tensor, spans: list[list[tuple[int, int]]]) -> torch.Tensor:
    """(B, phrases, tokens) float: 1 where a token lies within a phrase's character span (special tokens, dots and
    padding belong to none). Offsets are (B, tokens, 2) character spans of each token in its prompt."""
    most = max(len(row) for row in spans)
    padded = torch.tensor([row + [(-1, -1)] * (most - len(row)) for row in spans])  # (B, phrases, 2)
    start, end = offsets[..., 0].unsqueeze(1), offsets[..., 1].unsqueeze(1)  # (B, 1, tokens)
    real = ((attention > 0) & (offsets[..., 1] > offsets[..., 0])).unsqueeze(1)
    inside = (padded[..., 0:1] <= start) & (end <= padded[..., 1:2])
    return (real & inside).float()


def _to_pixels(box: list[float], side: int, width: int, height: int):
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

    def prepare(self, images: list[Picture]) -> None:
        """Nothing: no model looks at the pixels."""

    def ground(self, images: list[Picture], phrases: list[list[str]], prepared=None) -> list[list[GroundedObject]]:
        limit = int(self.params["max_objects"])
        found = []
        for image, wanted in zip(images, phrases, strict=True):
            width, height = picture_size(image)
            whole = (0.0, 0.0, float(width), float(height))
            found.append([GroundedObject(phrase, whole, 1.0) for phrase in wanted[:limit]])
        return found


def make_grounder(
    located: LocatedModel, device: torch.device, precision: str | None = None
) -> Grounder | WholeImageGrounder:
    """The grounding stage for a model spec: Grounding DINO, or the whole-image stand-in when grounding is off."""
    return Grounder(located, device, precision) if located.spec.weights else WholeImageGrounder(located, device)
