"""What `item features | train | eval | calibrate` share: the profile with its ablation swaps, the detector, and
one extraction run (the models, one feature cache, the input transform, the input limits).

The command line parses the options, builds what belongs to the service (the settings, a cache in the ledger)
and reports progress and errors: the functions here raise `ItemError` or `ValueError` and print nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.core.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile, with_models
from pipeline.core.transforms import Chain, parse_transform
from pipeline.lab import evaluation
from pipeline.lab.datasets import Sample
from pipeline.lab.features import ArtifactCache, FeatureSet, effective_transform, extract

if TYPE_CHECKING:
    from pipeline.core.head import Head
    from pipeline.core.model_store import ModelStore


def ablation_profile(profile: str, caption_model: str | None, clip_model: str | None, grounding: bool) -> str:
    """The name of `profile` with the swaps asked for (`--caption-model`, `--clip-model`, `--no-grounding`)."""
    swaps = {"caption": caption_model, "embed": clip_model, "ground": None if grounding else "off"}
    return with_models(get_profile(profile), **swaps).name


def load_detector(
    profile_name: str, store: ModelStore, device: str | None, precision, head: Head | None = None
) -> Detector:
    """The detector of a profile (by name, swaps included), with `head` if one is given."""
    return Detector(get_profile(profile_name), store, head, device, precision)


def input_transform(text: str | None) -> Chain:
    """The `--reencode` option's transform; none when not given."""
    return parse_transform(text or "none")


def transform_before_head(head: Head, reencode: str | None) -> Chain:
    """What goes before the head's own input transform (which the detector applies wherever the head scores):
    nothing, unless `--reencode` asks for something other than what the head was trained on."""
    return input_transform(None if reencode in (None, head.metadata.input_transform) else reencode)


@dataclass
class Run:
    """What every extraction of one command shares: models, one cache, the input transform, the input limits."""

    detector: Detector
    cache: ArtifactCache
    transform: Chain
    batch_size: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def limits(self) -> dict:
        """`extract`'s batch size and input limits."""
        return {"batch_size": self.batch_size, "max_pixels": self.max_pixels, "max_bytes": self.max_bytes}

    @property
    def effective_transform(self) -> Chain:
        """What an image goes through in all: this run's transform, then the detector's own."""
        return effective_transform(self.detector, self.transform)

    def extract(self, samples: Sequence[Sample], progress: Callable[[int], None] = lambda n: None) -> FeatureSet:
        return extract(samples, self.detector, self.cache, transform=self.transform, progress=progress, **self.limits())

    def robustness(
        self, samples: Sequence[Sample], head: Head, kinds: Sequence[str], report: evaluation.EvalReport, on_level
    ) -> list[evaluation.RobustnessRow]:
        """The robustness grid (paper Fig. 4) on these samples, after its clean row from `report` (the main
        evaluation); `on_level(kind, level)` returns the progress callback of that level's extraction."""
        rows = evaluation.robustness(
            samples, self.detector, self.cache, head, base=self.transform, kinds=kinds, on_level=on_level,
            **self.limits(),
        )  # fmt: skip
        return [evaluation.clean_row(report, self.effective_transform), *rows]
