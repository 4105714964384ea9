"""The ledger as the artifact cache of `item features|train|eval|calibrate`.

Untransformed images are keyed exactly as the worker keys them, so a head trained on a platform's checked
images reuses the captions, boxes and features the worker already stored, and the worker later reuses what
training computed.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.results import Artifacts
from worker.ledger.store import Ledger


class LedgerCache:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def load(self, sha256s: Sequence[str], versions: dict[str, str]) -> dict[str, Artifacts]:
        with self.ledger.session() as session:
            return self.ledger.load_artifacts(session, list(sha256s), versions)

    def save(self, items: dict[str, Artifacts], versions: dict[str, str]) -> None:
        with self.ledger.session() as session:
            for sha256, artifacts in items.items():
                self.ledger.save_artifacts(session, sha256, artifacts, versions)

    def flush(self) -> None:
        """Nothing to do: every save is its own committed transaction."""
