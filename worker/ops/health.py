"""`item health`: can this host serve checks? Each probe is bounded in time and reports, never raises."""

from __future__ import annotations

from collections.abc import Callable

from worker.settings import Settings

PROBE_TIMEOUT_S = 3


def check_health(settings: Settings, *, load_models: bool = False, probes: tuple[str, ...] | None = None) -> dict:
    """Runs the probes (all, or those named in `probes`: `item serve`'s readiness needs no broker or model)."""
    every: dict[str, Callable[[], str]] = {
        "database": lambda: _database(settings),
        "migrations": lambda: _migrations(settings),
        "broker": lambda: _broker(settings),
        "models": lambda: _models(settings, load_models),
    }
    checks = {name: _run(probe) for name, probe in every.items() if probes is None or name in probes}
    return {"ok": all(part["ok"] for part in checks.values()), "checks": checks}


def _run(probe: Callable[[], str]) -> dict:
    try:
        return {"ok": True, "detail": probe()}
    except Exception as error:  # a probe reports what failed, whatever it was
        return {"ok": False, "detail": f"{type(error).__name__}: {error}".strip()}


def _database(settings: Settings) -> str:
    import sqlalchemy as sa

    url = sa.make_url(settings.database_url)
    connect_args = {"connect_timeout": PROBE_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()
    return f"{url.get_backend_name()} reachable"


def _migrations(settings: Settings) -> str:
    from worker.ledger import migrate

    current, head = migrate.current(settings.database_url), migrate.head()
    if current != head:
        raise RuntimeError(f"ledger at {current}, code expects {head}: run `item db upgrade`")
    return f"at {head}"


def _broker(settings: Settings) -> str:
    if not settings.broker_url:
        return "none configured: checks run in-process"
    from worker.intake.broker import broker_connection

    with broker_connection(settings) as connection:
        connection.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_S)
        return f"{connection.transport_cls} reachable"


def _models(settings: Settings, load: bool) -> str:
    """The profile's models are on disk (never downloaded here) and the head fits them."""
    from worker.gpu.build import build_detector

    detector = build_detector(settings.model_copy(update={"allow_download": False}))
    if load:
        detector.load()
    return f"profile {detector.profile.name}, {detector.pipeline_version.id}" + (", loaded" if load else "")
