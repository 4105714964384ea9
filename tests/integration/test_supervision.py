"""A long-lived thread that dies makes the worker visibly not ready (/readyz, item_worker_ready), is counted, and is
restarted: the real deliverer on a real ledger, behind the real metrics endpoint."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.brokers import free_port
from worker.ledger.store import Ledger
from worker.ops import exporter, metrics, supervise
from worker.outbox.delivery import Deliverer
from worker.settings import Settings


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def endpoint(ledger, monkeypatch):
    monkeypatch.setattr(supervise, "RESTART_BACKOFF_S", (1.0, 2.0))
    settings = Settings(database_url=_url(ledger), metrics_port=free_port(), delivery_poll_s=0.05)
    thread = exporter.serve(settings)
    yield settings, f"http://127.0.0.1:{settings.metrics_port}"
    thread.stop(1)


def test_a_dead_deliverer_makes_the_worker_not_ready_until_it_is_restarted(endpoint, ledger, monkeypatch):
    settings, base = endpoint
    deliverer = Deliverer(settings, Ledger(_url(ledger)))
    real_pass, passes = deliverer.deliver_due, []

    def failing_once(*args, **kwargs):
        passes.append(time.monotonic())
        if len(passes) == 3:  # a BaseException: the deliverer's own `except Exception` does not catch it
            raise SystemExit("a bug in the delivery pass")
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(deliverer, "deliver_due", failing_once)
    before = metrics.THREAD_DEATHS.labels("deliverer")._value.get()
    metrics.WORKER_READY.set(1)
    deliverer.start()
    try:
        _until(lambda: len(passes) >= 3)
        status, body = _get(f"{base}/readyz")
        assert status == 503 and json.loads(body) == {"ready": False, "dead": ["deliverer"]}
        scraped = {s.name: s.value for f in text_string_to_metric_families(_get(f"{base}/metrics")[1].decode())
                   for s in f.samples if s.name in ("item_worker_ready", "item_thread_deaths_total")
                   and s.labels.get("thread", "deliverer") == "deliverer"}  # fmt: skip
        assert scraped["item_thread_deaths_total"] == before + 1
        assert scraped["item_worker_ready"] == 0  # not ready while a part is dead, whatever the GPU loops say
        _until(lambda: len(passes) >= 4)  # restarted after its backoff
        _until(lambda: _get(f"{base}/readyz")[0] == 200)
        assert json.loads(_get(f"{base}/readyz")[1]) == {"ready": True, "dead": []}
        assert _get(f"{base}/healthz")[0] == 200
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        deliverer.stop(5)
        metrics.WORKER_READY.set(0)


def _url(ledger: Ledger) -> str:
    return ledger.engine.url.render_as_string(hide_password=False)
