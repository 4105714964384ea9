"""Model profiles: which model every stage uses, as data.

A profile names one model per stage plus the stage's parameters. Everything that changes a stage's output
(model id, revision, parameters) ends up in that stage's version string, which keys stored artifacts.
Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.core.errors import ProfileError

WHOLE_IMAGE = "whole-image"


@dataclass(frozen=True)
class ModelSpec:
    """One model: where it comes from and how its stage runs it."""

    name: str  # folder name under the model directory
    repo_id: str | None = None  # Hugging Face hub id; None for models generated locally (tiny, *-random)
    revision: str = "main"
    seed: int | None = None  # set for generated models: random weights, built offline from this seed
    params: dict[str, Any] = field(default_factory=dict)
    # open_clip models: (built-in architecture, pretrained tag), used to write `open_clip_config.json` into a
    # downloaded folder whose hub repo lacks one (timm's OpenAI CLIP repos hold only the weights).
    open_clip: tuple[str, str] | None = None
    weights: bool = True  # False for a stage that runs no model (grounding off): nothing to fetch or load
    # True for the `sim` profile's stages: the host work is real, the model is the simulated device (a benchmark
    # instrument: pipeline.core.simulated)
    simulated: bool = False

    @property
    def generated(self) -> bool:
        return self.seed is not None

    @property
    def source(self) -> str:
        return self.repo_id or f"item/{self.name}"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    caption: ModelSpec
    ground: ModelSpec
    embed: ModelSpec

    @property
    def specs(self) -> dict[str, ModelSpec]:
        return {"caption": self.caption, "ground": self.ground, "embed": self.embed}

    @property
    def meaningless_scores(self) -> bool:
        """True for random-weight profiles, whose scores show the plumbing, not detection quality."""
        return all(spec.generated or not spec.weights for spec in self.specs.values())

    @property
    def simulated(self) -> bool:
        """True for a profile whose models are the simulated device: its results are no verdicts at all."""
        return any(spec.simulated for spec in self.specs.values())


# Grounding: the paper used GLIP-L, which transformers does not package; Grounding DINO is the closest
# phrase-grounding model that it does. One box per phrase (its best), kept above `box_threshold`, at most
# `max_objects` per image by score.
_GROUND_PARAMS = {"box_threshold": 0.35, "max_objects": 8, "max_phrases": 8, "canvas": 800}
_CAPTION_PARAMS = {"max_new_tokens": 30, "num_beams": 1}
# A random decoder repeats its favourite token; forbidding repeats keeps the tiny captions varied.
_TINY_CAPTION_PARAMS = {"max_new_tokens": 8, "num_beams": 1, "no_repeat_ngram_size": 1}
# Random full-size decoders rarely stop by themselves: every caption is exactly max_new_tokens long, which makes
# the decode cost fixed and comparable between runs (an upper bound: real captions are shorter).
_RANDOM_CAPTION_PARAMS = {**_CAPTION_PARAMS, "min_new_tokens": 30, "no_repeat_ngram_size": 1}
# OpenAI's CLIP was trained with QuickGELU; open_clip's default GELU silently skews embeddings.
_CLIP_PARAMS = {"quick_gelu": True, "batch_size": 64}

# Every model a stage can use, by stage and name: profiles pick from here, and so do ablations
# (`paper+embed=clip-rn50-openai`, see `get_profile`).
CATALOG: dict[str, dict[str, ModelSpec]] = {
    "caption": {
        spec.name: spec
        for spec in (
            ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", params=_CAPTION_PARAMS),
            ModelSpec("blip-image-captioning-base", "Salesforce/blip-image-captioning-base", params=_CAPTION_PARAMS),
            ModelSpec("blip-image-captioning-large", "Salesforce/blip-image-captioning-large", params=_CAPTION_PARAMS),
            ModelSpec("blip2-opt-2.7b-random", seed=0, params=_RANDOM_CAPTION_PARAMS),
            ModelSpec("blip-image-captioning-base-random", seed=0, params=_RANDOM_CAPTION_PARAMS),
            ModelSpec("tiny-blip2", seed=0, params=_TINY_CAPTION_PARAMS),
            ModelSpec("sim-blip2-opt-2.7b", seed=0, params=_RANDOM_CAPTION_PARAMS, simulated=True),
            ModelSpec("tiny-blip2-alt", seed=1, params=_TINY_CAPTION_PARAMS),
        )
    },
    "ground": {
        spec.name: spec
        for spec in (
            ModelSpec("grounding-dino-base", "IDEA-Research/grounding-dino-base", params=_GROUND_PARAMS),
            ModelSpec("grounding-dino-tiny", "IDEA-Research/grounding-dino-tiny", params=_GROUND_PARAMS),
            ModelSpec("grounding-dino-base-random", seed=0, params=_GROUND_PARAMS),
            ModelSpec("grounding-dino-tiny-random", seed=0, params=_GROUND_PARAMS),
            ModelSpec("sim-grounding-dino-base", seed=0, params=_GROUND_PARAMS, simulated=True),
            ModelSpec(
                "tiny-grounding-dino",
                seed=0,
                params={"box_threshold": 0.2, "max_objects": 4, "max_phrases": 4, "canvas": 96},
            ),
            # Grounding off: each object phrase is compared with the whole image instead of its box, which
            # isolates what localisation adds. Its limits come from the profile it replaces (`with_models`).
            ModelSpec(WHOLE_IMAGE, weights=False, params={"max_objects": 8, "max_phrases": 8}),
        )
    },
    "embed": {
        spec.name: spec
        for spec in (
            ModelSpec(
                "clip-vit-l-14-openai",
                "timm/vit_large_patch14_clip_224.openai",
                params=_CLIP_PARAMS,
                open_clip=("ViT-L-14-quickgelu", "openai"),
            ),
            ModelSpec(
                "clip-vit-b-16-openai",
                "timm/vit_base_patch16_clip_224.openai",
                params={**_CLIP_PARAMS, "batch_size": 128},
                open_clip=("ViT-B-16-quickgelu", "openai"),
            ),
            ModelSpec(
                "clip-rn50-openai",
                "timm/resnet50_clip.openai",
                params={**_CLIP_PARAMS, "batch_size": 128},
                open_clip=("RN50-quickgelu", "openai"),
            ),
            ModelSpec("clip-vit-l-14-random", seed=0, params=_CLIP_PARAMS),
            ModelSpec("clip-vit-b-16-random", seed=0, params={**_CLIP_PARAMS, "batch_size": 128}),
            ModelSpec("tiny-clip-quickgelu", seed=0, params=_CLIP_PARAMS),
            ModelSpec("sim-clip-vit-l-14", seed=0, params=_CLIP_PARAMS, simulated=True),
            ModelSpec("tiny-clip-quickgelu-alt", seed=1, params=_CLIP_PARAMS),
        )
    },
}
STAGES = tuple(CATALOG)
# Names people reach for on the command line, mapped to the stage they mean.
_STAGE_ALIASES = {"captioner": "caption", "grounding": "ground", "grounder": "ground", "clip": "embed"}

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="paper",
            description="The paper's models: BLIP-2 OPT-2.7b, Grounding DINO base (for GLIP-L), "
            "CLIP ViT-L/14 OpenAI. Weights alone ~10 GB on GPU (estimated from parameter counts).",
            caption=CATALOG["caption"]["blip2-opt-2.7b"],
            ground=CATALOG["ground"]["grounding-dino-base"],
            embed=CATALOG["embed"]["clip-vit-l-14-openai"],
        ),
        Profile(
            name="small",
            description="For smaller GPUs: BLIP base captioner, Grounding DINO tiny, CLIP ViT-B/16 OpenAI "
            "(weights ~2 GB, estimated).",
            caption=CATALOG["caption"]["blip-image-captioning-base"],
            ground=CATALOG["ground"]["grounding-dino-tiny"],
            embed=CATALOG["embed"]["clip-vit-b-16-openai"],
        ),
        Profile(
            name="paper-random",
            description="The paper's architectures at their real sizes with random weights, generated offline "
            "(BLIP-2 EVA ViT-g + OPT-2.7B, Grounding DINO Swin-B, CLIP ViT-L/14): speed and memory as the paper's "
            "models, scores mean nothing. About 15 GB of fp32 weights.",
            caption=CATALOG["caption"]["blip2-opt-2.7b-random"],
            ground=CATALOG["ground"]["grounding-dino-base-random"],
            embed=CATALOG["embed"]["clip-vit-l-14-random"],
        ),
        Profile(
            name="small-random",
            description="The small profile's architectures at their real sizes with random weights (BLIP base, "
            "Grounding DINO Swin-T, CLIP ViT-B/16), generated offline. Scores mean nothing.",
            caption=CATALOG["caption"]["blip-image-captioning-base-random"],
            ground=CATALOG["ground"]["grounding-dino-tiny-random"],
            embed=CATALOG["embed"]["clip-vit-b-16-random"],
        ),
        Profile(
            name="sim",
            description="A benchmark instrument, not a detector: the paper profile's host work for real (decoding, "
            "the downscale, BLIP-2's and Grounding DINO's processors at their real sizes, tokenizers, crops, "
            "batching) with every model call replaced by a simulated device held for the paper models' H100 time "
            "(ITEM_SIMULATED_DEVICE_MS). Its results say `simulated`; no trained head accepts it.",
            caption=CATALOG["caption"]["sim-blip2-opt-2.7b"],
            ground=CATALOG["ground"]["sim-grounding-dino-base"],
            embed=CATALOG["embed"]["sim-clip-vit-l-14"],
        ),
        Profile(
            name="tiny",
            description="Random-weight miniatures of the paper's architectures, generated offline "
            "(tests, CI, demo). Scores mean nothing.",
            caption=CATALOG["caption"]["tiny-blip2"],
            ground=CATALOG["ground"]["tiny-grounding-dino"],
            embed=CATALOG["embed"]["tiny-clip-quickgelu"],
        ),
    )
}


def get_profile(name: str) -> Profile:
    """A profile by name, or a base profile with some stages swapped: `paper+embed=clip-rn50-openai+ground=off`.

    Swapped profiles are how ablations run (caption model, CLIP backbone, grounding off) without code edits;
    their names are canonical, so the same swap always gives the same name and the same stage versions.
    """
    base_name, *swaps = (part.strip() for part in name.split("+"))
    try:
        base = PROFILES[base_name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ProfileError(f"Unknown model profile {base_name!r}; known profiles: {known}.") from None
    models = {}
    for swap in swaps:
        stage, _, model = swap.partition("=")
        models[_stage(stage.strip(), name)] = model.strip()
    return with_models(base, **models)


def with_models(base: Profile, **models: str | None) -> Profile:
    """`base` with the named stages' models replaced from the catalog (`ground="off"` turns grounding off)."""
    specs = dict(base.specs)
    for stage, model in models.items():
        if model:
            specs[stage] = _catalog_spec(stage, model, base)
    swapped = [f"{stage}={spec.name}" for stage, spec in specs.items() if spec != base.specs[stage]]
    if not swapped:
        return base
    description = f"{base.description} Swapped: {', '.join(swapped)}."
    return Profile("+".join([base.name, *swapped]), description, **specs)


def _stage(text: str, profile_name: str) -> str:
    stage = _STAGE_ALIASES.get(text, text)
    if stage not in CATALOG:
        raise ProfileError(
            f"{profile_name!r}: {text!r} is not a stage; write base+STAGE=MODEL with STAGE one of {', '.join(STAGES)}."
        )
    return stage


def _catalog_spec(stage: str, model: str, base: Profile) -> ModelSpec:
    if stage == "ground" and model in ("off", "none", WHOLE_IMAGE):
        # The canvas too: images are downscaled to the largest side any stage uses (the grounder's canvas), and
        # keeping it keeps the captions and CLIP's inputs of the base profile, so the ablation changes boxes alone.
        kept = ("max_objects", "max_phrases", "canvas")
        limits = {key: base.ground.params[key] for key in kept if key in base.ground.params}
        return replace(CATALOG["ground"][WHOLE_IMAGE], params=limits)
    try:
        return CATALOG[stage][model]
    except KeyError:
        known = ", ".join(sorted(CATALOG[stage]))
        raise ProfileError(f"Unknown {stage} model {model!r}; known: {known}.") from None
