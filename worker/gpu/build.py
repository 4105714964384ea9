"""Wiring: settings → ledger + detector + head → a `CheckService`. One place, used by the worker, CLI and tests."""

from __future__ import annotations

from worker.gpu.batches import CheckService
from worker.ledger.store import Ledger
from worker.settings import Settings

UNTRAINED_HEAD = "untrained"  # ITEM_HEAD / --head value: a seeded untrained head, for random-weight profiles only


def build_detector(settings: Settings):
    from pipeline.core.detector import Detector, untrained_head
    from pipeline.core.errors import HeadError
    from pipeline.core.head import Head
    from pipeline.core.model_store import ModelStore
    from pipeline.core.profiles import get_profile

    profile = get_profile(settings.profile)
    if settings.head is None:
        message = "No head given: set ITEM_HEAD (or pass --head to `item scan`); `item demo` trains a tiny one."
        raise HeadError(message, code="head.missing")
    untrained = str(settings.head) == UNTRAINED_HEAD
    if untrained and not profile.meaningless_scores:
        message = f"--head {UNTRAINED_HEAD} is only for random-weight profiles; {profile.name!r} needs a trained head."
        raise HeadError(message, code="head.untrained_refused")
    if profile.simulated:  # this process's simulated device, at the times the settings give
        from pipeline.core import simulated

        simulated.configure(settings.simulated_device_ms)
    store = ModelStore(settings.model_dir, allow_download=settings.allow_download)
    head = None if untrained else Head.load(settings.head)
    detector = Detector(
        profile, store, head, settings.device, precision=settings.stage_precision,
        provenance_policy=settings.provenance_decides,
    )  # fmt: skip
    if untrained:  # random models: their scores mean nothing whatever the head, so an untrained one serves
        detector.use_head(untrained_head(detector))
    return detector


def build_service(settings: Settings) -> CheckService:
    return CheckService(settings, Ledger(settings.database_url), build_detector(settings))
