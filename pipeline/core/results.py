"""What the detector hands back: per-image artifacts (reusable) and detections (the answer plus evidence).

Plain data. torch is named only in annotations, so the ledger and the client can read and write results
without importing it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.core.simulated import SIMULATED_MARK

if TYPE_CHECKING:
    import torch

    from pipeline.core.provenance import Provenance


VERDICTS = ("real", "uncertain", "fake")


def verdict(p_fake: float, threshold: float, threshold_low: float | None = None) -> str:
    """`fake` at or above `threshold`; with a band, `real` below `threshold_low` and `uncertain` between: an honest
    "unsure" instead of a coin flip near the threshold. Without one, `real` below `threshold`, as always."""
    if p_fake >= threshold:
        return "fake"
    if threshold_low is not None and p_fake >= threshold_low:
        return "uncertain"
    return "real"


TOP_GENERATORS = 3  # the likeliest generators a result names


def top_generators(shares: list[float], groups: list[str], limit: int = TOP_GENERATORS) -> list[dict]:
    """An attribution head's shares (in the order of its groups, "real" first) as the likeliest generators."""
    ranked = sorted(zip(groups[1:], shares[1:], strict=True), key=lambda pair: -pair[1])
    return [{"generator": name, "p": round(float(p), 6)} for name, p in ranked[:limit]]


@dataclass(frozen=True)
class GroundedObject:
    """An object phrase of the caption and where the grounder found it."""

    phrase: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the (oriented) input image
    score: float


@dataclass
class Embeddings:
    """CLIP embeddings, unnormalised, float32: the whole image and caption, then one row per object."""

    image: torch.Tensor  # (d,)  I_0
    text: torch.Tensor  # (d,)  T_0
    object_images: torch.Tensor  # (n, d)  I_i
    object_texts: torch.Tensor  # (n, d)  T_i


@dataclass
class Features:
    """The misalignment vectors (Eq. 4 and 6) from which any w1/w2 gives D (Eq. 7-8)."""

    global_: torch.Tensor  # (d,)  D_g
    objects: torch.Tensor  # (n, d)  D_l^i


@dataclass
class Artifacts:
    """Everything the stages produced for one image. A field already set (from storage) is not recomputed."""

    caption: str | None = None
    objects: list[GroundedObject] | None = None
    embeddings: Embeddings | None = None
    features: Features | None = None
    provenance: Provenance | None = None  # read from the bytes, not by a stage: kept with the rest for re-scores


@dataclass
class Analysis:
    """One image after the model stages, before the head."""

    sha256: str | None
    artifacts: Artifacts
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage; 0 where an artifact was reused
    computed: list[str] = field(default_factory=list)  # the model stages that ran for this image, in order


@dataclass(frozen=True)
class PipelineVersion:
    caption: str
    ground: str
    embed: str
    head: str

    @property
    def id(self) -> str:
        """A short stable id for the whole tuple, for indexes and labels."""
        digest = hashlib.sha256(json.dumps(self.stages, sort_keys=True).encode()).hexdigest()
        return f"pv-{digest[:16]}"

    @property
    def stages(self) -> dict[str, str]:
        return {"caption": self.caption, "ground": self.ground, "embed": self.embed, "head": self.head}

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, **self.stages}


@dataclass(frozen=True)
class DetectedObject:
    phrase: str
    box: tuple[float, float, float, float]
    score: float  # the grounder's confidence
    misalignment: float  # |D_l^i|: how far this crop sits from its phrase in CLIP space


@dataclass
class Detection:
    sha256: str | None
    p_fake: float
    threshold: float
    caption: str
    objects: list[DetectedObject]
    timings_ms: dict[str, float]
    pipeline_version: PipelineVersion
    artifacts: Artifacts
    computed: list[str] = field(default_factory=list)  # the model stages that ran (the rest reused artifacts)
    threshold_low: float | None = None  # the uncertain band's lower edge, when the head has one
    provenance: Provenance | None = None  # what the bytes declare; None where it was not read
    decided_by: str | None = None  # set when provenance, not the score, made the verdict (`provenance.c2pa`)
    attribution: list[dict] | None = None  # an attribution head's likeliest generators: [{"generator", "p"}]
    simulated: bool = False  # made by the `sim` profile's simulated device: a benchmark's output, never a verdict

    @property
    def verdict(self) -> str:
        return "fake" if self.decided_by else verdict(self.p_fake, self.threshold, self.threshold_low)

    @property
    def verdict_reason(self) -> str:
        """What made the verdict: `score`, a provenance declaration, or `simulated` (nothing: a benchmark ran)."""
        return self.decided_by or (SIMULATED_MARK if self.simulated else "score")

    @property
    def object_count(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict:
        return {
            "sha256": self.sha256,
            "p_fake": round(self.p_fake, 6),
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "threshold": self.threshold,
            "threshold_low": self.threshold_low,
            "caption": self.caption,
            "objects": [
                {
                    "phrase": o.phrase,
                    "box": list(o.box),
                    "score": round(o.score, 4),
                    "misalignment": round(o.misalignment, 4),
                }
                for o in self.objects
            ],
            "object_count": self.object_count,
            "attribution": self.attribution,
            "provenance": self.provenance.to_dict() if self.provenance is not None else None,
            "timings_ms": {stage: round(ms, 2) for stage, ms in self.timings_ms.items()},
            "pipeline_version": self.pipeline_version.to_dict(),
        }
