"""The classification head: a two-layer MLP from the misalignment vector D to P(AI-generated).

An attribution head (`item train --attribute`) has one output per training group instead of two: "real" and
each generator. Its P(fake) is 1 - P(real), so thresholds, calibration and evaluation treat it as any head,
and `attribute` gives the share of each group.

On disk a head is two files side by side: `NAME.safetensors` (weights; never pickle) and `NAME.json`
(what it was trained on: profile, stage versions, w1/w2, widths, threshold, training summary). A head only
makes sense on features from the exact stage versions it was trained with, so loading it next to other
models is refused instead of silently scoring garbage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.errors import HeadError
from pipeline.core.misalignment import DEFAULT_W1, DEFAULT_W2
from pipeline.core.results import verdict
from pipeline.core.simulated import SIMULATED_MARK

FORMAT_VERSION = 1
DEFAULT_HIDDEN = 256  # the paper gives no width; 256 is ample for a 768-d input and trains in seconds
DEFAULT_THRESHOLD = 0.5  # the paper reports accuracy at a fixed 0.5
HEAD_STAGES = ("caption", "ground", "embed")


REAL_GROUP = "real"  # an attribution head's first output


def mlp(input_dim: int, hidden: int, outputs: int = 2) -> nn.Sequential:
    """Paper Eq. 9: a two-layer fully connected head, with 2 outputs (real, fake) or one per group."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


@dataclass
class HeadMetadata:
    profile: str
    stage_versions: dict[str, str]
    input_dim: int
    hidden: int = DEFAULT_HIDDEN
    w1: float = DEFAULT_W1
    w2: float = DEFAULT_W2
    threshold: float = DEFAULT_THRESHOLD  # fake at or above
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # What the inputs went through before the stages (`item train --reencode`): scoring applies it too.
    input_transform: str = "none"
    # The code rules the features depend on besides the models (the phrase chunker, the no-object rule), as
    # they were at training; empty for heads saved before they were recorded.
    rules: dict[str, str] = field(default_factory=dict)
    # The lower edge of the uncertain band (`item calibrate --fakes`): real below it. None: no band.
    threshold_low: float | None = None
    # An attribution head's outputs, in order: "real" first, then each generator it was trained on. None: the
    # paper's two outputs (real, fake).
    groups: list[str] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and (len(self.groups) < 2 or self.groups[0] != REAL_GROUP):
            raise HeadError(f"An attribution head's groups start with {REAL_GROUP!r}; got {self.groups!r}.")

    @property
    def outputs(self) -> int:
        return len(self.groups) if self.groups else 2

    @classmethod
    def from_json(cls, data: dict) -> HeadMetadata:
        """Heads saved before `input_transform` was a field kept it in their training summary."""
        if "input_transform" not in data:
            data = {**data, "input_transform": data.get("training", {}).get("input_transform", "none")}
        return cls(**data)


class Head:
    def __init__(self, module: nn.Sequential, metadata: HeadMetadata):
        self.module = module.eval()
        self.metadata = metadata

    @classmethod
    def create(cls, metadata: HeadMetadata, seed: int = 0) -> Head:
        torch.manual_seed(seed)
        return cls(mlp(metadata.input_dim, metadata.hidden, metadata.outputs), metadata)

    @property
    def version(self) -> str:
        """`head:<hash>` of everything that decides a score: weights, inputs, w1/w2, threshold.

        The training summary is left out (it holds wall-clock times), so retraining identically gives the
        same version, while any change of weights or threshold gives a new one.
        """
        scoring = {key: value for key, value in asdict(self.metadata).items() if key != "training"}
        # Left out at their defaults, so heads saved before these fields existed keep their versions.
        for key, default in (("input_transform", "none"), ("rules", {}), ("threshold_low", None), ("groups", None)):
            if scoring[key] == default:
                del scoring[key]
        digest = hashlib.sha256(json.dumps(scoring, sort_keys=True).encode())
        for name, tensor in sorted(self.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"head:{digest.hexdigest()[:16]}"

    @property
    def attributes(self) -> bool:
        """Whether this head names generators (one output per group), not only real against fake."""
        return self.metadata.groups is not None

    @torch.inference_mode()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax over the outputs for each row of D, shape (n, input_dim) → (n, outputs)."""
        if features.shape[0] == 0:
            return torch.empty(0, self.metadata.outputs)
        return self.module(features.float()).softmax(dim=-1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """P(fake) for each row of D, shape (n, input_dim) → (n,): the fake output, or for an attribution head
        everything but "real"."""
        return self.fake_share(self.probabilities(features))

    def fake_share(self, probabilities: torch.Tensor) -> torch.Tensor:
        """P(fake) from the softmax over the outputs: the fake output, or everything but "real"."""
        return probabilities[:, 1] if not self.attributes else 1 - probabilities[:, 0]

    def attribute(self, features: torch.Tensor) -> torch.Tensor:
        """P(group) for each row of D, in the order of `metadata.groups`: (n, len(groups))."""
        if not self.attributes:
            raise HeadError("This head was not trained to attribute generators (item train --attribute).")
        return self.probabilities(features)

    def verdict(self, p_fake: float) -> str:
        return verdict(p_fake, self.metadata.threshold, self.metadata.threshold_low)

    @property
    def untrained(self) -> bool:
        """A head made without training (`untrained_head`), for profiles whose scores mean nothing."""
        return bool(self.metadata.training.get("untrained"))

    def check_compatible(self, stage_versions: dict[str, str], rules: dict[str, str] | None = None) -> None:
        """Refuses features from any stage version, or code rule, other than the ones this head was trained on.

        A head that recorded no rules (saved before they were) is taken to have been trained with today's. No head
        but an untrained one accepts the simulated device's stages: their features are made up."""
        if any(SIMULATED_MARK in version for version in stage_versions.values()) and not self.untrained:
            raise HeadError(
                "The models are the simulated device (profile 'sim'), a benchmark instrument whose outputs are made "
                "up: it scores nothing. Run it with the untrained head (--head untrained / ITEM_HEAD=untrained).",
                code="head.simulated_refused",
            )
        differing = [
            f"{stage}: head has {self.metadata.stage_versions.get(stage)!r}, models are {stage_versions.get(stage)!r}"
            for stage in HEAD_STAGES
            if self.metadata.stage_versions.get(stage) != stage_versions.get(stage)
        ]
        differing += [
            f"{rule}: head has {trained!r}, this code has {(rules or {}).get(rule)!r}"
            for rule, trained in self.metadata.rules.items()
            if rules is not None and rules.get(rule) != trained
        ]
        if differing:
            raise HeadError(
                "This head was trained for other models than the ones loaded; retrain it or load the models "
                f"it was trained with (profile {self.metadata.profile!r}). " + "; ".join(differing),
                code="head.version_mismatch",
            )

    def save(self, path: Path | str) -> Path:
        """Writes PATH.safetensors and PATH.json; returns the weights path."""
        weights, meta = head_paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, weights)
        meta.write_text(json.dumps(asdict(self.metadata), indent=2, sort_keys=True) + "\n")
        return weights

    @classmethod
    def load(cls, path: Path | str) -> Head:
        weights, meta = head_paths(path)
        for required in (weights, meta):
            if not required.is_file():
                raise HeadError(f"Head file {required} does not exist.", code="head.missing")
        try:
            metadata = HeadMetadata.from_json(json.loads(meta.read_text()))
            module = mlp(metadata.input_dim, metadata.hidden, metadata.outputs)
            module.load_state_dict(load_file(weights))
        except Exception as error:
            raise HeadError(f"Head {weights} is unreadable or inconsistent: {error}", code="head.corrupt") from error
        if metadata.format_version != FORMAT_VERSION:
            raise HeadError(f"Head {weights} has format {metadata.format_version}; expected {FORMAT_VERSION}.")
        return cls(module, metadata)


def head_paths(path: Path | str) -> tuple[Path, Path]:
    """A head is named by its weights file, the shared stem, or a folder holding `head.safetensors`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "head.safetensors"
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")
