"""Training the head on misalignment vectors, the paper's way: AdamW, lr 1e-3, wd 1e-3, 50 epochs, CE on 2 logits.

An attribution head (`item train --attribute`) is trained the same way with one logit per class: "real", then
each generator among the fakes. Its validation keeps the real-against-fake figures, so both kinds of head read
alike, and adds how often a fake is put down to its own generator.

Only the head is trained; every pretrained model stays frozen, so training needs only the D vectors.
Same features + same seed → the same head, bit for bit (on the same device and torch version).
The head of the last epoch is kept, as in the paper; a validation set is scored after every epoch so the
curve shows whether that was a good place to stop.

`item train` goes through `fit`: a head on the feature sets of cached extraction, after the checks of
`check_classes` (both classes; for attribution, every class it names), with `representation_weights` for the
Fig. 5 ablation and `split_features` for a held-out validation set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.core.detector import RULE_VERSIONS, Detector
from pipeline.core.head import DEFAULT_HIDDEN, REAL_GROUP, Head, HeadMetadata
from pipeline.core.transforms import Chain
from pipeline.lab.datasets import REAL, Sample, split
from pipeline.lab.detection_metrics import accuracy, average_precision

if TYPE_CHECKING:
    from pipeline.lab.features import FeatureSet

UNSEEN = -1  # the class of a validation fake from a generator the attribution head has no output for
REPRESENTATIONS = {"both": (1.0, 1.0), "global": (1.0, 0.0), "local": (0.0, 1.0)}  # (w1, w2) of Eq. 8: Fig. 5


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 64
    hidden: int = DEFAULT_HIDDEN
    seed: int = 0


@dataclass(frozen=True)
class Epoch:
    """What one epoch ended with; validation figures are None without a validation set."""

    number: int  # 1-based
    train_loss: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_ap: float | None = None
    val_attribution_accuracy: float | None = None  # attribution heads only


def attribution_groups(samples: Sequence[Sample]) -> list[str]:
    """An attribution head's classes: "real" (every real sample, whatever its folder), then each generator
    among the fakes, sorted by name so that the same data gives the same outputs in the same order."""
    return [REAL_GROUP, *sorted({sample.group for sample in samples if sample.label != REAL})]


def class_indices(samples: Sequence[Sample], groups: Sequence[str]) -> torch.Tensor:
    """Each sample's class among `groups` (0 for every real sample), or UNSEEN for a fake of another generator."""
    position = {group: index for index, group in enumerate(groups) if index > 0}
    return torch.tensor(
        [REAL if sample.label == REAL else position.get(sample.group, UNSEEN) for sample in samples],
        dtype=torch.long,
    )


def attribution_accuracy(probabilities: torch.Tensor, classes: torch.Tensor) -> float:
    """The share of fakes of a known generator whose likeliest generator (real left aside) is their own.

    Real left aside, so that this says how well the head names generators, apart from how well it spots fakes.
    NaN when no such fake is given."""
    known = classes > 0
    if not known.any():
        return math.nan
    named = probabilities[known, 1:].argmax(dim=-1) + 1
    return float((named == classes[known]).float().mean())


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    metadata: HeadMetadata,
    config: TrainConfig,
    *,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[Epoch], None] = lambda epoch: None,
) -> Head:
    """Fits a fresh head to (D, label) pairs; labels are 0 = real, 1 = fake, or for an attribution head
    (`metadata.groups`) each sample's `class_indices`. Validation labels are of the same kind."""
    if features.shape[0] == 0 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Need matching, non-empty features and labels; got {features.shape[0]} and {labels.shape[0]}."
        )
    if labels.min() < 0 or labels.max() >= metadata.outputs:
        raise ValueError(f"Training labels must be class indices from 0 to {metadata.outputs - 1}.")
    started = time.perf_counter()
    head = Head.create(replace(metadata, hidden=config.hidden), seed=config.seed)
    model = head.module
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    features, labels = features.float(), labels.long()
    epochs = []
    for number in range(1, config.epochs + 1):
        model.train()
        epoch_loss = 0.0
        for batch in torch.randperm(len(labels), generator=order).split(config.batch_size):
            loss = F.cross_entropy(model(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach()) * len(batch)
        model.eval()
        epochs.append(_epoch(head, number, epoch_loss / len(labels), validation))
        on_epoch(epochs[-1])
    head.metadata.training = _summary(head, config, features, labels, epochs, time.perf_counter() - started)
    return head


def _epoch(head: Head, number: int, train_loss: float, validation) -> Epoch:
    if validation is None or len(validation[1]) == 0:
        return Epoch(number, train_loss)
    features, classes = validation[0].float(), validation[1].long()
    fake = (classes != REAL).long()
    p_fake = head.predict(features)
    return Epoch(
        number,
        train_loss,
        val_loss=_real_fake_loss(head, features, fake),
        val_accuracy=accuracy(fake, p_fake, head.metadata.threshold),
        val_ap=average_precision(fake.numpy(), p_fake.numpy()),
        val_attribution_accuracy=attribution_accuracy(head.attribute(features), classes) if head.attributes else None,
    )


def _real_fake_loss(head: Head, features: torch.Tensor, fake: torch.Tensor) -> float:
    """Cross-entropy of real against fake, P(fake) being every output but real's: for a two-output head this is
    its training loss, and an attribution head's validation loss stays comparable with it."""
    with torch.inference_mode():
        log_p = head.module(features).log_softmax(dim=-1)
    log_fake = log_p[:, 1:].logsumexp(dim=-1)
    return float(-torch.where(fake == 1, log_fake, log_p[:, 0]).mean())


def _summary(head: Head, config: TrainConfig, features, labels, epochs: list[Epoch], seconds: float) -> dict:
    last, fake = epochs[-1], (labels != REAL).long()
    summary = {
        **asdict(config),
        "n_train": int(len(labels)),
        "n_fake": int(fake.sum()),
        "final_loss": round(last.train_loss, 6),
        "train_accuracy": round(accuracy(fake, head.predict(features), head.metadata.threshold), 6),
        "loss_curve": [round(epoch.train_loss, 6) for epoch in epochs],
        "seconds": round(seconds, 3),
    }
    if head.attributes:
        counts = torch.bincount(labels, minlength=head.metadata.outputs).tolist()
        summary["classes"] = dict(zip(head.metadata.groups, counts, strict=True))
    if last.val_loss is not None:
        summary["validation"] = {
            "loss": round(last.val_loss, 6),
            "accuracy": round(last.val_accuracy, 6),
            "average_precision": round(last.val_ap, 6),
            "loss_curve": [round(epoch.val_loss, 6) for epoch in epochs],
        }
        if head.attributes:
            summary["validation"]["attribution_accuracy"] = round(last.val_attribution_accuracy, 6)
    return summary


# ---------------------------------------------------------------------------------------------- on feature sets


def representation_weights(representation: str, w1: float | None, w2: float | None) -> tuple[float, float]:
    """(w1, w2) for `--representation` (both, global or local), unless given themselves."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"--representation must be one of {', '.join(REPRESENTATIONS)}, not {representation!r}.")
    d1, d2 = REPRESENTATIONS[representation]
    return (d1 if w1 is None else w1), (d2 if w2 is None else w2)


def split_features(features: FeatureSet, val_fraction: float, seed: int) -> tuple[FeatureSet, FeatureSet]:
    """(train, validation): `val_fraction` held out per generator and class, as `datasets.split` does."""
    train_samples, val_samples = split(features.samples, val_fraction, seed)
    position = {id(sample): index for index, sample in enumerate(features.samples)}
    rows = [position[id(sample)] for sample in train_samples], [position[id(sample)] for sample in val_samples]
    return features.subset(rows[0]), features.subset(rows[1])


def check_classes(train_set: FeatureSet, groups: list[str] | None = None) -> None:
    """ValueError unless the training set has both classes and, for an attribution head (`groups`), two
    generators to tell apart and a training image of every class it names."""
    present = set(train_set.labels.tolist())
    if present != {0, 1}:
        missing = "fake" if 0 in present else "real"
        raise ValueError(f"The training data has no readable {missing} images; a head needs both classes.")
    if not groups:
        return
    generators = groups[1:]
    if len(generators) < 2:
        found = f"only {generators[0]!r}" if generators else "none"
        raise ValueError(
            f"--attribute needs fakes from at least 2 generator folders; found {found}. "
            "Train without --attribute for real against fake."
        )
    if REAL_GROUP in generators:
        raise ValueError(f"A generator folder named {REAL_GROUP!r} clashes with the real class; rename it.")
    present = set(class_indices(train_set.samples, groups).tolist())
    missing = [group for index, group in enumerate(groups) if index not in present]
    if missing:
        raise ValueError(
            f"The training data has no readable images of {', '.join(missing)}; --attribute needs every class it names."
        )


def head_metadata(
    profile: str,
    detector: Detector,
    train_set: FeatureSet,
    weights: tuple[float, float],
    transform: Chain,
    groups: list[str] | None = None,
) -> HeadMetadata:
    """The metadata of a head to train on `train_set`: the models, the code rules and the input transform the
    features came from, and (w1, w2)."""
    dim = int(train_set.global_.shape[1])
    return HeadMetadata(
        profile, detector.stage_versions, dim, w1=weights[0], w2=weights[1], input_transform=transform.id,
        rules=dict(RULE_VERSIONS), groups=groups,
    )  # fmt: skip


def targets(feature_set: FeatureSet, metadata: HeadMetadata) -> torch.Tensor:
    """What the head learns for each image: its label, or an attribution head's class index."""
    return class_indices(feature_set.samples, metadata.groups) if metadata.groups else feature_set.labels


def fit(
    train_set: FeatureSet,
    val_set: FeatureSet,
    metadata: HeadMetadata,
    config: TrainConfig,
    on_epoch: Callable[[Epoch], None] = lambda epoch: None,
) -> Head:
    """`train_head` on the representation (w1, w2 of `metadata`) of feature sets; an empty `val_set`: none."""
    w1, w2 = metadata.w1, metadata.w2
    validation = (val_set.representation(w1, w2), targets(val_set, metadata)) if len(val_set.samples) else None
    features, labels = train_set.representation(w1, w2), targets(train_set, metadata)
    return train_head(features, labels, metadata, config, validation=validation, on_epoch=on_epoch)
