"""Training the head on misalignment vectors, the paper's way: AdamW, lr 1e-3, wd 1e-3, 50 epochs, CE on 2 logits.

Only the head is trained; every pretrained model stays frozen, so training needs only the D vectors.
Same features + same seed → the same head, bit for bit (on the same device and torch version).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from pipeline.head import DEFAULT_HIDDEN, Head, HeadMetadata


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 64
    hidden: int = DEFAULT_HIDDEN
    seed: int = 0


def train_head(features: torch.Tensor, labels: torch.Tensor, metadata: HeadMetadata, config: TrainConfig) -> Head:
    """Fits a fresh head to (D, label) pairs; labels are 0 = real, 1 = fake."""
    if features.shape[0] == 0 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Need matching, non-empty features and labels; got {features.shape[0]} and {labels.shape[0]}."
        )
    started = time.perf_counter()
    head = Head.create(replace(metadata, hidden=config.hidden), seed=config.seed)
    model = head.module.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    features, labels = features.float(), labels.long()
    losses = []
    for _ in range(config.epochs):
        epoch_loss = 0.0
        for batch in torch.randperm(len(labels), generator=order).split(config.batch_size):
            loss = F.cross_entropy(model(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach()) * len(batch)
        losses.append(epoch_loss / len(labels))
    model.eval()
    head.metadata.training = {
        **asdict(config),
        "n_train": int(len(labels)),
        "n_fake": int(labels.sum()),
        "final_loss": round(losses[-1], 6),
        "train_accuracy": round(accuracy(head.predict(features), labels, head.metadata.threshold), 6),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return head


def accuracy(p_fake: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    return float(((p_fake >= threshold).long() == labels.long()).float().mean()) if len(labels) else float("nan")
