"""The `sim` profile's stages: the real stages' host work with every model call replaced by the simulated device.

Each class is the real stage (its processor, tokenizer, batching, crop geometry and result handling run as they
do for the paper's models) with only the method that calls the model overridden: it holds this process's
`pipeline.core.simulated` device for the model's time on that many images, then returns outputs of the real
shapes, so every later stage, the ledger and the deliveries run for real. What the outputs say is made up
(derived from the pixels, so the same image always gets the same caption and boxes): a benchmark instrument,
never a verdict. Their versions say `simulated`; a trained head refuses them (`Head.check_compatible`).
"""

from __future__ import annotations

import json
import random
import zlib

import torch

from pipeline.core import simulated
from pipeline.core.clip_input import Box
from pipeline.core.model_input import PixelRecipe
from pipeline.core.stages.caption import Captioner
from pipeline.core.stages.embed import Embedder
from pipeline.core.stages.ground import Grounder

# Made-up captions: four objects each, as GPU.md's per-image device time assumes (k = 4 crops).
_NOUNS = (
    "dog", "cat", "horse", "car", "tree", "house", "bicycle", "boat", "chair", "table", "window", "lamp", "flower",
    "bird", "clock", "umbrella", "bench", "mountain", "road", "bottle",
)  # fmt: skip
_ADJECTIVES = ("red", "small", "old", "wooden", "white", "large", "green", "dark")


class _Simulated:
    """What every simulated stage adds: its version says so, and its model is never loaded."""

    @property
    def version(self) -> str:
        return super().version + f"|{simulated.SIMULATED_MARK}"


def _seeds(pixels: torch.Tensor) -> list[int]:
    """A number per image (row) from a sparse sample of its own pixels: the same image gives the same made-up
    outputs, whatever else is in its batch."""
    sample = pixels.reshape(len(pixels), -1)[:, ::4099].contiguous()
    return [zlib.crc32(row.numpy().tobytes()) for row in sample]


def _caption_of(seed: int) -> str:
    """Four distinct objects, as GPU.md's per-image device time assumes."""
    chooser = random.Random(seed)
    first, second, third, fourth = chooser.sample(_NOUNS, 4)
    return f"a {chooser.choice(_ADJECTIVES)} {first} next to a {second} with a {third} and a {fourth}"


def _made_up(seeds: list[int], shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """(len(seeds), *shape) uniform in [low, high), each row from its own seed."""
    rows = [torch.rand(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return low + (high - low) * torch.stack(rows)


class SimulatedCaptioner(_Simulated, Captioner):
    def _load(self) -> None:
        from transformers import AutoProcessor

        self.dtype = torch.float32
        self.processor = AutoProcessor.from_pretrained(self.located.path)
        self.recipe = PixelRecipe.of(self.processor.image_processor)

    def _generate_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        simulated.device().hold("caption", len(pixels))
        captions = [_caption_of(seed) for seed in _seeds(pixels)]
        length = int(self.params.get("max_new_tokens", 30))
        ids = self.processor.tokenizer(captions, padding="max_length", truncation=True, max_length=length)
        return torch.tensor(ids["input_ids"])


class SimulatedGrounder(_Simulated, Grounder):
    def _load(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.located.path)
        canvas = int(self.params["canvas"])
        self.recipe = PixelRecipe.of(self.processor.image_processor, size=(canvas, canvas))
        self.max_text_len = int(json.loads((self.located.path / "config.json").read_text())["max_text_len"])

    def _best_boxes(self, pixels: torch.Tensor, text: dict[str, torch.Tensor], owners: torch.Tensor):
        simulated.device().hold("ground", len(owners))
        seeds, phrases = _seeds(pixels), owners.shape[1]
        scores = _made_up(seeds, (phrases,), 0.4, 0.95)  # above the 0.35 threshold
        centres = _made_up([seed + 1 for seed in seeds], (phrases, 2), 0.2, 0.8)
        sizes = _made_up([seed + 2 for seed in seeds], (phrases, 2), 0.1, 0.4)
        return scores, torch.cat([centres, sizes], dim=-1), owners.any(-1)


class SimulatedEmbedder(_Simulated, Embedder):
    def _load(self) -> None:
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{self.located.path}")
        self._token_cache = {}

    @property
    def dim(self) -> int:
        return int(self._from_config("embedding width", lambda config: config["model_cfg"]["embed_dim"]))

    def embed_images(self, images, boxes=None, prepared=None) -> torch.Tensor:
        """As the real one: its runs are launched one after another, and the copy back to the CPU at the end waits
        for them."""
        embeddings = super().embed_images(images, boxes, prepared)
        simulated.device().synchronize()
        return embeddings

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        embeddings = super().embed_texts(texts)
        simulated.device().synchronize()
        return embeddings

    def _encode_pictures(self, pictures: list[tuple[torch.Tensor, Box | None]]) -> torch.Tensor:
        """Crops are cut on a real device: only their geometry is host work, and the device time covers the rest."""
        simulated.device().launch("embed_image", len(pictures))
        seeds = [
            zlib.crc32(whole[:, ::97, ::97].contiguous().numpy().tobytes() + repr(box).encode())
            for whole, box in pictures
        ]
        return _made_up(seeds, (self.dim,), -1.0, 1.0)

    def _encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        simulated.device().launch("embed_text", len(tokens))
        return _made_up([zlib.crc32(row.numpy().tobytes()) for row in tokens], (self.dim,), -1.0, 1.0)


SIMULATED_STAGES = {"caption": SimulatedCaptioner, "ground": SimulatedGrounder, "embed": SimulatedEmbedder}
