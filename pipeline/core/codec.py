"""Artifacts ↔ stored form (a JSON payload plus optional float32 bytes): one pair per kind, exact round trips
(n = 0 included). The worker's ledger and the on-disk feature cache both store artifacts this way.

Tensors are stored as one float32 little-endian matrix per artifact rather than as JSON numbers: compact,
exact, and independent of the machine that wrote them. The payload records the shape, so a zero-object
image (n = 0) comes back with correctly shaped empty tensors.

numpy and torch are imported by the functions that handle vectors: the ledger imports this module, and the
client side (submit, status, results) must start without loading them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from pipeline.core.provenance import Provenance
from pipeline.core.results import Artifacts, Embeddings, Features, GroundedObject

if TYPE_CHECKING:
    import torch

# Artifact kind (the version key's name) → the `Artifacts` field it fills.
FIELDS = {
    "caption": "caption",
    "ground": "objects",
    "embed": "embeddings",
    "features": "features",
    "provenance": "provenance",
}
_FLOAT32_LE = "<f4"  # numpy's name for float32, little-endian: the stored byte order on every machine


def version_hash(version: str) -> str:
    """The primary-key form of a version key: version keys can be long, 32 hex characters are plenty."""
    return hashlib.sha256(version.encode()).hexdigest()[:32]


def encode(kind: str, value) -> tuple[dict, bytes | None]:
    """(payload, vectors) for one artifact of `kind`."""
    return _ENCODERS[kind](value)


def decode(kind: str, payload: dict, vectors: bytes | None):
    """The artifact of `kind` that `encode` turned into (payload, vectors)."""
    return _DECODERS[kind](payload, vectors)


def set_field(artifacts: Artifacts, kind: str, value) -> None:
    setattr(artifacts, FIELDS[kind], value)


def get_field(artifacts: Artifacts, kind: str):
    return getattr(artifacts, FIELDS[kind])


def encode_caption(caption: str) -> tuple[dict, None]:
    return {"text": caption}, None


def decode_caption(payload: dict, _vectors: bytes | None) -> str:
    return payload["text"]


def encode_objects(objects: list[GroundedObject]) -> tuple[dict, None]:
    rows = [{"phrase": o.phrase, "box": [float(v) for v in o.box], "score": float(o.score)} for o in objects]
    return {"objects": rows}, None


def decode_objects(payload: dict, _vectors: bytes | None) -> list[GroundedObject]:
    return [GroundedObject(o["phrase"], tuple(o["box"]), o["score"]) for o in payload["objects"]]


def encode_provenance(provenance: Provenance) -> tuple[dict, None]:
    return provenance.to_dict(), None


def decode_provenance(payload: dict, _vectors: bytes | None) -> Provenance:
    return Provenance.from_dict(payload)


def encode_embeddings(e: Embeddings) -> tuple[dict, bytes]:
    """Rows [I_0, T_0, I_1..I_n, T_1..T_n]."""
    import torch

    n, dim = e.object_images.shape[0], e.image.shape[-1]
    rows = torch.cat([e.image.reshape(1, dim), e.text.reshape(1, dim), e.object_images, e.object_texts])
    return {"n": n, "dim": dim}, _to_bytes(rows)


def decode_embeddings(payload: dict, vectors: bytes | None) -> Embeddings:
    n = payload["n"]
    rows = _from_bytes(vectors, 2 + 2 * n, payload["dim"])
    return Embeddings(image=rows[0], text=rows[1], object_images=rows[2 : 2 + n], object_texts=rows[2 + n :])


def encode_features(f: Features) -> tuple[dict, bytes]:
    """Rows [D_g, D_l^1..D_l^n]."""
    import torch

    n, dim = f.objects.shape[0], f.global_.shape[-1]
    return {"n": n, "dim": dim}, _to_bytes(torch.cat([f.global_.reshape(1, dim), f.objects]))


def decode_features(payload: dict, vectors: bytes | None) -> Features:
    rows = _from_bytes(vectors, 1 + payload["n"], payload["dim"])
    return Features(global_=rows[0], objects=rows[1:])


def _to_bytes(rows: torch.Tensor) -> bytes:
    import torch

    return rows.detach().to("cpu", torch.float32).numpy().astype(_FLOAT32_LE, copy=False).tobytes()


def _from_bytes(data: bytes | None, n_rows: int, dim: int) -> torch.Tensor:
    import numpy as np
    import torch

    if data is None or len(data) != n_rows * dim * np.dtype(_FLOAT32_LE).itemsize:
        raise ValueError(f"stored vectors do not hold {n_rows}x{dim} float32 values")
    array = np.frombuffer(data, dtype=_FLOAT32_LE).reshape(n_rows, dim)
    return torch.from_numpy(array.astype(np.float32))  # a native-order, writable copy


_ENCODERS = {
    "caption": encode_caption,
    "ground": encode_objects,
    "embed": encode_embeddings,
    "features": encode_features,
    "provenance": encode_provenance,
}
_DECODERS = {
    "caption": decode_caption,
    "ground": decode_objects,
    "embed": decode_embeddings,
    "features": decode_features,
    "provenance": decode_provenance,
}
