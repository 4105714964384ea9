"""Model profiles: which model every stage uses, as data.

A profile names one model per stage plus the stage's parameters. Everything that changes a stage's output
(model id, revision, parameters) ends up in that stage's version string, which keys stored artifacts.
Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ProfileError


@dataclass(frozen=True)
class ModelSpec:
    """One model: where it comes from and how its stage runs it."""

    name: str  # folder name under the model directory
    repo_id: str | None = None  # Hugging Face hub id; None for models generated locally (tiny)
    revision: str = "main"
    tiny_seed: int | None = None  # set for generated models: built offline from this seed
    params: dict[str, Any] = field(default_factory=dict)
    # open_clip models: (built-in architecture, pretrained tag), used to write `open_clip_config.json` into a
    # downloaded folder whose hub repo lacks one (timm's OpenAI CLIP repos hold only the weights).
    open_clip: tuple[str, str] | None = None

    @property
    def generated(self) -> bool:
        return self.tiny_seed is not None

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
        return all(spec.generated for spec in self.specs.values())


# Grounding: the paper used GLIP-L, which transformers does not package; Grounding DINO is the closest
# phrase-grounding model that it does. One box per phrase (its best), kept above `box_threshold`, at most
# `max_objects` per image by score.
_GROUND_PARAMS = {"box_threshold": 0.35, "max_objects": 8, "max_phrases": 8, "canvas": 800}
_CAPTION_PARAMS = {"max_new_tokens": 30, "num_beams": 1}

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="paper",
            description="The paper's models: BLIP-2 OPT-2.7b, Grounding DINO base (for GLIP-L), "
            "CLIP ViT-L/14 OpenAI. Weights alone ~10 GB on GPU (estimated from parameter counts).",
            caption=ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", params=_CAPTION_PARAMS),
            ground=ModelSpec("grounding-dino-base", "IDEA-Research/grounding-dino-base", params=_GROUND_PARAMS),
            embed=ModelSpec(
                "clip-vit-l-14-openai",
                "timm/vit_large_patch14_clip_224.openai",
                # OpenAI's CLIP was trained with QuickGELU; open_clip's default GELU silently skews embeddings.
                params={"quick_gelu": True, "batch_size": 64},
                open_clip=("ViT-L-14-quickgelu", "openai"),
            ),
        ),
        Profile(
            name="small",
            description="For smaller GPUs: BLIP base captioner, Grounding DINO tiny, CLIP ViT-B/16 OpenAI "
            "(weights ~2 GB, estimated).",
            caption=ModelSpec(
                "blip-image-captioning-base", "Salesforce/blip-image-captioning-base", params=_CAPTION_PARAMS
            ),
            ground=ModelSpec("grounding-dino-tiny", "IDEA-Research/grounding-dino-tiny", params=_GROUND_PARAMS),
            embed=ModelSpec(
                "clip-vit-b-16-openai",
                "timm/vit_base_patch16_clip_224.openai",
                params={"quick_gelu": True, "batch_size": 128},
                open_clip=("ViT-B-16-quickgelu", "openai"),
            ),
        ),
        Profile(
            name="tiny",
            description="Random-weight miniatures of the paper's architectures, generated offline "
            "(tests, CI, demo). Scores mean nothing.",
            caption=ModelSpec(
                "tiny-blip2",
                tiny_seed=0,
                # A random decoder repeats its favourite token; forbidding repeats keeps captions varied.
                params={"max_new_tokens": 8, "num_beams": 1, "no_repeat_ngram_size": 1},
            ),
            ground=ModelSpec(
                "tiny-grounding-dino",
                tiny_seed=0,
                params={"box_threshold": 0.2, "max_objects": 4, "max_phrases": 4, "canvas": 96},
            ),
            embed=ModelSpec("tiny-clip-quickgelu", tiny_seed=0, params={"quick_gelu": True, "batch_size": 64}),
        ),
    )
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ProfileError(f"Unknown model profile {name!r}; known profiles: {known}.") from None
