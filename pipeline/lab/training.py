"""Training the head on misalignment vectors, the paper's way: AdamW, lr 1e-3, wd 1e-3, 50 epochs, CE on 2 logits.

Only the head is trained; every pretrained model stays frozen, so training needs only the D vectors.
Same features + same seed → the same head, bit for bit (on the same device and torch version).
The head of the last epoch is kept, as in the paper; a validation set is scored after every epoch so the
curve shows whether that was a good place to stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from pipeline.core.head import DEFAULT_HIDDEN, Head, HeadMetadata
from pipeline.lab.detection_metrics import accuracy, average_precision


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


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    metadata: HeadMetadata,
    config: TrainConfig,
    *,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_epoch: Callable[[Epoch], None] = lambda epoch: None,
) -> Head:
    """Fits a fresh head to (D, label) pairs; labels are 0 = real, 1 = fake."""
    if features.shape[0] == 0 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Need matching, non-empty features and labels; got {features.shape[0]} and {labels.shape[0]}."
        )
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
    features, labels = validation[0].float(), validation[1].long()
    with torch.inference_mode():
        loss = float(F.cross_entropy(head.module(features), labels))
    p_fake = head.predict(features)
    return Epoch(
        number,
        train_loss,
        val_loss=loss,
        val_accuracy=accuracy(labels, p_fake, head.metadata.threshold),
        val_ap=average_precision(labels.numpy(), p_fake.numpy()),
    )


def _summary(head: Head, config: TrainConfig, features, labels, epochs: list[Epoch], seconds: float) -> dict:
    last = epochs[-1]
    summary = {
        **asdict(config),
        "n_train": int(len(labels)),
        "n_fake": int(labels.sum()),
        "final_loss": round(last.train_loss, 6),
        "train_accuracy": round(accuracy(labels, head.predict(features), head.metadata.threshold), 6),
        "loss_curve": [round(epoch.train_loss, 6) for epoch in epochs],
        "seconds": round(seconds, 3),
    }
    if last.val_loss is not None:
        summary["validation"] = {
            "loss": round(last.val_loss, 6),
            "accuracy": round(last.val_accuracy, 6),
            "average_precision": round(last.val_ap, 6),
            "loss_curve": [round(epoch.val_loss, 6) for epoch in epochs],
        }
    return summary
