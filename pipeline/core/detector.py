"""The ITEM detector: a batch of images through caption → ground → embed → misalign → head.

Each step runs only for the images whose artifact for it is missing, so a caller that stored artifacts
(the worker's ledger, a feature cache) passes them back in and pays only for what changed. Artifacts are
keyed by `artifact_versions`, which chain each stage's version to the ones it consumed: a new captioner
invalidates boxes and embeddings too, a new CLIP keeps captions and boxes.

Before any stage looks at an image, the head's input transform (what its training images went through, such
as a JPEG re-encoding) is applied, and the image is downscaled once to `max_side` (see there); stages work in
the pixels of that copy, and results report boxes in the original's. The transform and the code rules the
features depend on (the phrase chunker, the no-object rule) are part of the artifacts' keys, and a head records
the rules it was trained with: a change to any of them is never a silent reuse of stored artifacts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from pipeline.core import misalignment as eq
from pipeline.core.devices import resolve_device
from pipeline.core.errors import HeadError
from pipeline.core.head import Head, HeadMetadata
from pipeline.core.imaging import DOWNSCALE_FILTER, DecodedImage, StageImage, downscale
from pipeline.core.model_store import LocatedModel, ModelStore
from pipeline.core.phrases import PHRASES_VERSION, object_phrases
from pipeline.core.prepared import Prepared, StageInputs
from pipeline.core.profiles import Profile
from pipeline.core.provenance import deciding_reason
from pipeline.core.results import (
    Analysis,
    Artifacts,
    DetectedObject,
    Detection,
    Embeddings,
    Features,
    GroundedObject,
    PipelineVersion,
    top_generators,
)
from pipeline.core.stages.base import Stage
from pipeline.core.stages.caption import Captioner
from pipeline.core.stages.embed import Embedder
from pipeline.core.stages.ground import make_grounder
from pipeline.core.stages.simulated import SIMULATED_STAGES
from pipeline.core.transforms import IDENTITY, Chain, parse_transform

FEATURES_VERSION = "misalign:eq3-7,no_object=global"
RULE_VERSIONS = {"phrases": PHRASES_VERSION, "features": FEATURES_VERSION}  # recorded by heads, checked on load
_ARTIFACT_ORDER = ("caption", "objects", "embeddings", "features")  # each computed from the ones before


class Detector:
    def __init__(
        self,
        profile: Profile,
        store: ModelStore,
        head: Head | None = None,
        device: str = "auto",
        precision: dict[str, str] | None = None,
        provenance_policy: str = "off",
    ):
        """`precision` overrides the profile's per stage (`{"ground": "bf16"}`); it enters the stage versions.
        `provenance_policy` says which declarations of AI generation make a verdict `fake` whatever the score
        (see `pipeline.core.provenance.deciding_reason`)."""
        self.profile = profile
        self.provenance_policy = provenance_policy
        self.device = resolve_device(device)
        precision = precision or {}
        self.captioner = _stage("caption", store.locate(profile.caption), self.device, precision.get("caption"))
        self.grounder = _stage("ground", store.locate(profile.ground), self.device, precision.get("ground"))
        self.embedder = _stage("embed", store.locate(profile.embed), self.device, precision.get("embed"))
        self.max_side = _downscale_side([stage.input_side for stage in (self.captioner, self.grounder, self.embedder)])
        self.head: Head | None = None
        self.input_transform: Chain = IDENTITY  # the head's: what its training images went through
        self._pipeline_version: PipelineVersion | None = None
        if head is not None:
            self.use_head(head)

    # ------------------------------------------------------------------ versions

    @property
    def stage_versions(self) -> dict[str, str]:
        """Each stage's version and the side its images were downscaled to, which the profile decides, not the
        stage: a profile with a larger grounder canvas gives its captioner larger images."""
        side = f"|max_side={self.max_side},{DOWNSCALE_FILTER}" if self.max_side else ""
        return {stage.name: stage.version + side for stage in (self.captioner, self.grounder, self.embedder)}

    @property
    def artifact_versions(self) -> dict[str, str]:
        """The key each artifact is stored under (see `artifact_versions_under`), for this detector's inputs."""
        return self.artifact_versions_under(self.input_transform)

    def artifact_versions_under(self, transform: Chain) -> dict[str, str]:
        """The key of each artifact of images that went through `transform`: its stage's version (grounding with
        the chunker's rules that made its phrases) plus a digest of its inputs' keys; and the transform, unless
        none (so untransformed keys stay what they were)."""
        versions = self.stage_versions
        caption = versions["caption"]
        ground = f"{versions['ground']}|phrases={PHRASES_VERSION}|after={_digest(caption)}"
        embed = f"{versions['embed']}|after={_digest(ground)}"
        features = f"{FEATURES_VERSION}|after={_digest(embed)}"
        keys = {"caption": caption, "ground": ground, "embed": embed, "features": features}
        suffix = "" if transform.id == IDENTITY.id else f"|input={transform.id}"
        return {kind: key + suffix for kind, key in keys.items()}

    @property
    def pipeline_version(self) -> PipelineVersion:
        if self._pipeline_version is None:
            raise ValueError("A pipeline version needs a head; load one with use_head().")
        return self._pipeline_version

    def use_head(self, head: Head) -> None:
        head.check_compatible(self.stage_versions, RULE_VERSIONS)
        try:
            self.input_transform = parse_transform(head.metadata.input_transform)
        except ValueError as error:
            raise HeadError(f"The head's input transform is unusable: {error}", code="head.corrupt") from None
        self.head = head
        # Computed once: hashing the head's weights costs ~1 ms, and the worker asks for the version per check.
        self._pipeline_version = PipelineVersion(**self.stage_versions, head=head.version)

    def load(self) -> None:
        """Loads every model now rather than on first use (a worker does this once, before serving)."""
        for stage in (self.captioner, self.grounder, self.embedder):
            stage.load()

    # ------------------------------------------------------------------ running

    def detect(
        self,
        images: Sequence[DecodedImage | None],
        known: Sequence[Artifacts | None] | None = None,
        prepared: Prepared | None = None,
    ) -> list[Detection]:
        """Scores a batch. `images[i]` may be None when `known[i]` already holds its features. `prepared` is
        `prepare(images, known)` when the host work was done ahead (on another thread, while the device ran)."""
        if self.head is None:
            raise ValueError("detect() needs a head; load one with use_head(), or call analyze() for features.")
        analyses = self.analyze(images, known, prepared)
        started = time.perf_counter()
        features = torch.stack([self.representation(a.artifacts.features) for a in analyses]) if analyses else None
        shares = self.head.probabilities(features) if features is not None else None  # one pass for both answers
        probabilities = self.head.fake_share(shares).tolist() if shares is not None else []
        attributions = self._attribute(shares, len(analyses))
        head_ms = (time.perf_counter() - started) * 1000 / max(1, len(analyses))
        version = self.pipeline_version
        return [
            Detection(
                sha256=analysis.sha256,
                p_fake=p_fake,
                threshold=self.head.metadata.threshold,
                threshold_low=self.head.metadata.threshold_low,
                caption=analysis.artifacts.caption or "",
                objects=_evidence(analysis.artifacts),
                timings_ms={**analysis.timings_ms, "head": head_ms},
                pipeline_version=version,
                artifacts=analysis.artifacts,
                computed=analysis.computed,
                provenance=analysis.artifacts.provenance,
                decided_by=deciding_reason(analysis.artifacts.provenance, self.provenance_policy),
                attribution=attribution,
                simulated=self.profile.simulated,
            )
            for analysis, p_fake, attribution in zip(analyses, probabilities, attributions, strict=True)
        ]

    def _attribute(self, shares: torch.Tensor | None, count: int) -> list[list[dict] | None]:
        """The likeliest generators of each image from the head's `shares`, for an attribution head; None for each
        with another head."""
        if shares is None or not self.head.attributes:
            return [None] * count
        return [top_generators(row, self.head.metadata.groups) for row in shares.tolist()]

    def representation(self, features: Features) -> torch.Tensor:
        """D for one image with the head's w1/w2 (Eq. 7-8)."""
        w1, w2 = (self.head.metadata.w1, self.head.metadata.w2) if self.head else (eq.DEFAULT_W1, eq.DEFAULT_W2)
        return eq.representation(features.global_, features.objects, w1, w2)

    def analyze(
        self,
        images: Sequence[DecodedImage | None],
        known: Sequence[Artifacts | None] | None = None,
        prepared: Prepared | None = None,
    ) -> list[Analysis]:
        """Runs the model stages that are missing for each image; returns artifacts and per-stage timings."""
        known = known if known is not None else [None] * len(images)
        if len(known) != len(images):
            raise ValueError(f"{len(images)} images but {len(known)} artifact sets.")
        prepared = prepared if prepared is not None else self.prepare(images, known)
        analyses = [
            Analysis(image.sha256 if image else None, replace(artifacts) if artifacts else Artifacts())
            for image, artifacts in zip(images, known, strict=True)
        ]
        for image, analysis in zip(images, analyses, strict=True):
            if image is not None and analysis.artifacts.provenance is None:
                analysis.artifacts.provenance = image.provenance  # read from its bytes: see `batches.Reader`
        prepared_now = set(_missing(analyses, "embeddings", images))
        for index, analysis in enumerate(analyses):
            analysis.timings_ms["prepare"] = prepared.ms_per_image if index in prepared_now else 0.0
        self._caption(prepared.staged, analyses, prepared)
        self._ground(prepared.staged, analyses, prepared)
        self._embed(prepared.staged, analyses, prepared)
        self._misalign(analyses)
        return analyses

    def prepare(
        self, images: Sequence[DecodedImage | None], known: Sequence[Artifacts | None] | None = None
    ) -> Prepared:
        """The host work before the models, for the images whose artifacts are missing: each image downscaled
        once to `max_side` (after the head's input transform), then each stage's processor on the images it will
        run. A worker calls it for the next batch on another thread while `detect` runs this one. Timed as
        `prepare`, like a stage: its cost grows with the upload's size, the models' does not."""
        known = known if known is not None else [None] * len(images)
        analyses = [Analysis(None, artifacts or Artifacts()) for artifacts in known]
        started = time.perf_counter()
        todo = _missing(analyses, "embeddings", images)  # every earlier stage's images are among these
        staged: list[StageImage | None] = [None] * len(images)
        transform = None if self.input_transform.id == IDENTITY.id else self.input_transform
        for index in todo:
            pixels = images[index].image if transform is None else transform(images[index].image)
            staged[index] = downscale(pixels, self.max_side)
        inputs = {}
        for artifact, stage in (("caption", self.captioner), ("objects", self.grounder), ("embeddings", self.embedder)):
            rows = _missing(analyses, artifact, images)
            if rows:
                inputs[stage.name] = StageInputs(rows, stage.prepare([staged[i].pixels for i in rows]))
        ms = (time.perf_counter() - started) * 1000 / max(1, len(todo))
        return Prepared(staged, inputs, ms)

    def _caption(self, images, analyses: list[Analysis], prepared: Prepared) -> None:
        todo = _missing(analyses, "caption", images)
        with _timed(analyses, todo, self.captioner):
            captions = self.captioner.caption([images[i].pixels for i in todo], prepared.of("caption", todo))
        for index, caption in zip(todo, captions, strict=True):
            analyses[index].artifacts.caption = caption

    def _ground(self, images, analyses: list[Analysis], prepared: Prepared) -> None:
        todo = _missing(analyses, "objects", images)
        limit = int(self.grounder.params["max_phrases"])
        phrases = [object_phrases(analyses[i].artifacts.caption, limit) for i in todo]
        pixels = prepared.of("ground", todo)
        with _timed(analyses, todo, self.grounder):
            found = self.grounder.ground([images[i].pixels for i in todo], phrases, pixels)
        for index, objects in zip(todo, found, strict=True):
            staged = images[index]
            analyses[index].artifacts.objects = [
                GroundedObject(obj.phrase, staged.to_original(obj.box), obj.score) for obj in objects
            ]

    def _embed(self, images, analyses: list[Analysis], prepared: Prepared) -> None:
        """One batched image forward and one text forward for all wholes and crops of the batch."""
        todo = _missing(analyses, "embeddings", images)
        pictures, boxes, texts, counts = [], [], [], []
        for index in todo:
            staged, artifacts = images[index], analyses[index].artifacts
            pictures.append(staged.pixels)
            boxes.append([staged.from_original(obj.box) for obj in artifacts.objects])  # stored boxes too
            texts += [artifacts.caption] + [obj.phrase for obj in artifacts.objects]
            counts.append(1 + len(artifacts.objects))
        with _timed(analyses, todo, self.embedder):
            host = prepared.of("embed", todo)
            image_rows = self.embedder.embed_images(pictures, boxes, host).split(counts) if todo else []
            text_rows = self.embedder.embed_texts(texts).split(counts) if todo else []
        for index, image_part, text_part in zip(todo, image_rows, text_rows, strict=True):
            embeddings = Embeddings(image_part[0], text_part[0], image_part[1:], text_part[1:])
            analyses[index].artifacts.embeddings = embeddings

    def _misalign(self, analyses: list[Analysis]) -> None:
        for analysis in analyses:
            artifacts = analysis.artifacts
            if artifacts.features is None:
                emb = artifacts.embeddings
                artifacts.features = Features(
                    eq.misalignment(emb.image, emb.text), eq.misalignment(emb.object_images, emb.object_texts)
                )


def _stage(kind: str, located: LocatedModel, device: torch.device, precision: str | None) -> Stage:
    """The stage running `located`'s model: the simulated device's stand-in for a `sim` model, the whole-image
    grounder when grounding is off, else the real one."""
    if located.spec.simulated:
        return SIMULATED_STAGES[kind](located, device, precision)
    if kind == "ground":
        return make_grounder(located, device, precision)
    return {"caption": Captioner, "embed": Embedder}[kind](located, device, precision)


def _downscale_side(sides: list[int | None]) -> int | None:
    """The longest side any stage makes use of, which images are downscaled to: the grounder's canvas in every
    profile (800 against BLIP's 384 and CLIP's 224; 96 against 64 and 64 in `tiny`), so no stage gets fewer
    pixels along the longer side than its own processor would have kept.

    The largest rather than CLIP's size, because CLIP also sees crops: at 800 pixels an object a quarter of the
    image wide still gets ~200 of CLIP's 224, and its box was placed on that same 800-pixel canvas, so more
    pixels would not make the crop more faithful. What it costs: the short side of a panorama wider than about
    2:1 falls below BLIP's square input, which then stretches it (it squeezed it before).
    """
    return max((side for side in sides if side), default=None)


def _missing(analyses: list[Analysis], field_name: str, images) -> list[int]:
    """Indices that need artifact `field_name`: neither it nor anything computed from it is known."""
    downstream = _ARTIFACT_ORDER[_ARTIFACT_ORDER.index(field_name) :]
    todo = [
        index
        for index, analysis in enumerate(analyses)
        if all(getattr(analysis.artifacts, name) is None for name in downstream)
    ]
    for index in todo:
        if images[index] is None:
            raise ValueError(f"Image {index} has no stored {field_name} and no pixels to compute it from.")
    return todo


@contextmanager
def _timed(analyses: list[Analysis], todo: list[int], stage: Stage):
    """Charges a batch's wall time to its images in equal shares; images that reused the artifact get 0.

    The model is loaded first, outside the clock: a first batch should not look slow for a one-off load.
    """
    if todo:
        stage.load()
    started = time.perf_counter()
    yield
    _charge(analyses, todo, stage.name, started)
    for index in todo:
        analyses[index].computed.append(stage.name)


def _charge(analyses: list[Analysis], todo: list[int], step: str, started: float) -> None:
    """The time since `started`, in equal shares to the images in `todo` and 0 to the others, as `step`."""
    share = (time.perf_counter() - started) * 1000 / max(1, len(todo))
    touched = set(todo)
    for index, analysis in enumerate(analyses):
        analysis.timings_ms[step] = share if index in touched else 0.0


def _evidence(artifacts: Artifacts) -> list[DetectedObject]:
    objects = artifacts.objects or []
    distances = eq.magnitudes(artifacts.features.objects).tolist() if objects else []
    return [DetectedObject(o.phrase, o.box, o.score, d) for o, d in zip(objects, distances, strict=True)]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def untrained_head(detector: Detector, seed: int = 0) -> Head:
    """A seeded, never-trained head fitting `detector`'s stages: for random-weight profiles, whose scores mean
    nothing whatever the head, so that they run (and can be measured) without training one first."""
    metadata = HeadMetadata(
        profile=detector.profile.name,
        stage_versions=detector.stage_versions,
        input_dim=detector.embedder.dim,
        training={"untrained": True, "seed": seed},
        rules=dict(RULE_VERSIONS),
    )
    return Head.create(metadata, seed=seed)
