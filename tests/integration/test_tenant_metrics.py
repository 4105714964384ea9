"""The `tenant` label stays bounded: with 25 tenants and ITEM_METRICS_TENANTS=20, a scrape shows `default`, the 19
heaviest others and `other`, and nothing counted is lost in the folding (real ledger, real exposition)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.core.results import PipelineVersion
from worker.ledger import tenants
from worker.ledger.models import DEFAULT_TENANT
from worker.ops import metrics
from worker.ops.exporter import ProcessesCollector, ScrapeTimeCollector
from worker.ops.tenant_labels import OTHER, TenantLabels
from worker.settings import Settings

NAMES = [f"t{i:02d}" for i in range(1, 25)]  # with `default`: 25 tenants


@pytest.fixture
def many(ledger) -> Settings:
    """25 tenants, t01 the lightest and t24 the heaviest, t20 and t21 tied (then by id)."""
    with ledger.session() as session:
        for i, name in enumerate(NAMES, start=1):
            weight = 20 if name in ("t20", "t21") else i
            tenants.create_tenant(session, name, tenants.TenantLimits(weight=weight))
    return Settings(database_url=ledger.engine.url.render_as_string(hide_password=False), metrics_tenants=20)


def test_the_chosen_tenants_are_default_and_the_heaviest(many):
    chosen = TenantLabels(many).chosen()
    assert chosen == {DEFAULT_TENANT, *(f"t{i:02d}" for i in range(6, 25))}  # t01..t05, the lightest, are `other`


def test_counters_of_25_tenants_are_folded_to_20_values_and_other(many):
    # given checks finished for every tenant (in this process's registry)
    for i, tenant_id in enumerate([DEFAULT_TENANT, *NAMES]):
        metrics.finished("done", None, None, tenant_id)
        metrics.QUOTA_REFUSED.labels(tenant_id, "rate").inc(i + 1)
    # when the exporter collects them
    families = {family.name: family for family in ProcessesCollector(False, TenantLabels(many)).collect()}
    # then at most 20 tenants keep their label, the rest are summed under `other`, and the totals are kept
    done = {s.labels["tenant"]: s.value for s in families["item_checks"].samples
            if s.name == "item_checks_total" and s.labels["status"] == "done"}  # fmt: skip
    assert set(done) <= {DEFAULT_TENANT, *NAMES[5:], OTHER} and len(set(done) - {OTHER}) <= 20
    assert done[OTHER] >= 5  # t01..t05 at least (other tenants of this process's earlier tests too)
    refused = {s.labels["tenant"]: s.value for s in families["item_quota_refused"].samples
               if s.name == "item_quota_refused_total" and s.labels["reason"] == "rate"}  # fmt: skip
    assert refused[OTHER] >= sum(range(2, 7)) and refused["t24"] >= 25


def test_the_backlog_is_reported_per_chosen_tenant_and_other(ledger, many):
    # given queued checks of a chosen tenant, of two tenants folded into `other`, and of the default tenant
    with ledger.session() as session:
        version = PipelineVersion("c:1", "g:1", "e:1", "h:1")
        ledger.ensure_pipeline_version(session, version, "tiny")
        for tenant_id, n in (("t24", 3), ("t01", 2), ("t02", 1), (DEFAULT_TENANT, 1)):
            for i in range(n):
                ledger.create_check(session, external_id=f"w-{i}", pipeline_version_id=version.id,
                                    source={"url": "http://x/"}, tenant_id=tenant_id)  # fmt: skip
    # when the exporter reads the ledger at scrape time
    collector = ScrapeTimeCollector(many.model_copy(update={"broker_url": None}), TenantLabels(many))
    registry = CollectorRegistry()
    registry.register(collector)
    waiting = {
        (s.labels["priority"], s.labels["tenant"]): s.value
        for s in next(f for f in collector.collect() if f.name == "item_checks_waiting").samples
    }
    # then each chosen tenant has its own series, every other one is `other`, and none is lost
    assert waiting[("fresh", "t24")] == 3 and waiting[("fresh", OTHER)] == 3 and waiting[("fresh", DEFAULT_TENANT)] == 1
    assert len({tenant for _, tenant in waiting}) == 21
    assert sum(n for (priority, _), n in waiting.items() if priority == "fresh") == 7
    # and the exposition passes Prometheus' own check
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    checked = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry).decode(),
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
