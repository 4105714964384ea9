"""Operations through a real two-process worker: the metrics endpoint, JSON logs, and `item health`."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.results import PipelineVersion
from tests.integration.brokers import free_port
from tests.integration.stack import Worker, make_stack, run_item
from worker.ops.exporter import ScrapeTimeCollector
from worker.ops.metrics import METRIC_NAMES


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    port = str(free_port())
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("ops"),
        ITEM_METRICS_PORT=port,
        ITEM_METRICS_ADDR="127.0.0.1",
        ITEM_BATCH_SIZE="1",
        ITEM_BATCH_MAX_WAIT_S="0",
    )


@pytest.fixture(scope="module")
def worked(stack):
    """A two-process worker that has finished 16 checks, one per batch, so both processes take some."""
    worker = Worker(stack, "two-processes", concurrency=2)
    submitted = stack.submit(*[str(stack.image(500 + i)) for i in range(16)])
    rows = stack.wait_terminal([s["check_id"] for s in submitted])
    yield worker, rows
    worker.stop()


def _scrape(stack) -> str:
    url = f"http://127.0.0.1:{stack.env['ITEM_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_add_up_the_work_of_every_process(stack, worked):
    worker, rows = worked
    batches = [json.loads(line) for line in worker.log.read_text().splitlines() if '"batch checks=' in line]
    assert len({line["process"] for line in batches}) >= 2  # both pool processes did some of the work
    samples = _samples(_scrape(stack))
    assert samples[("item_checks_total", (("code", ""), ("status", "done"), ("tenant", "default")))] == len(rows) == 16
    assert samples[("item_worker_ready", ())] == 2  # one per process with models loaded
    readyz = f"http://127.0.0.1:{stack.env['ITEM_METRICS_PORT']}/readyz"
    with urllib.request.urlopen(readyz, timeout=10) as response:  # every part alive, both GPU loops serving
        assert response.status == 200 and json.loads(response.read()) == {"ready": True, "dead": []}
    assert samples[("item_batch_size_count", ())] >= 16
    version = next(iter(rows.values())).pipeline_version_id
    assert samples[("item_score_count", (("pipeline_version", version),))] == 16
    flagged = samples.get(("item_flagged_total", (("pipeline_version", version), ("verdict", "fake"))), 0)
    assert flagged == sum(row.verdict == "fake" for row in rows.values())
    assert samples[("item_queue_depth", (("queue", "item.checks"),))] == 0
    assert samples[("item_checks_waiting", (("priority", "fresh"), ("tenant", "default")))] == 0
    assert samples[("item_checks_waiting", (("priority", "rescore"), ("tenant", "default")))] == 0
    assert samples[("item_checks_stuck", (("status", "running"),))] == 0
    # Every failure code an alert watches is exported from the start, at 0.
    assert samples[("item_checks_total", (("code", "check.timeout"), ("status", "failed"), ("tenant", "default")))] == 0


def test_the_backlog_is_read_from_the_broker_under_its_prefix_and_from_the_ledger(stack):
    # given messages the intake has not filed under a key prefix no worker reads, and checks waiting in the ledger
    prefix = f"{stack.prefix}depth:"
    stack.redis.rpush(f"{prefix}item.checks", *["unfiled"] * 3)
    idle = PipelineVersion("caption:c", "ground:g", "embed:e", "no worker runs this head")
    with stack.ledger.session() as session:
        before = stack.ledger.count_waiting(session)
        stack.ledger.ensure_pipeline_version(session, idle, "tiny", activate=False)
        for i in range(2):
            stack.ledger.create_check(
                session, external_id=f"waiting-{i}", pipeline_version_id=idle.id, source={"url": "http://x/"}
            )
    try:
        # when the exporter collects with that prefix
        settings = stack.settings.model_copy(update={"redis_key_prefix": prefix})
        families = {family.name: family for family in ScrapeTimeCollector(settings).collect()}
        # then the broker's queue is reported by its unprefixed name, and the ledger's backlog per priority
        depth = {sample.labels["queue"]: sample.value for sample in families["item_queue_depth"].samples}
        assert depth == {"item.checks": 3}
        waiting = {"fresh": 0, "rescore": 0}  # per tenant: summed here, as the alerts do
        for sample in families["item_checks_waiting"].samples:
            waiting[sample.labels["priority"]] += sample.value
        assert waiting == {"fresh": before["fresh"] + 2, "rescore": before["rescore"]}
    finally:
        stack.redis.delete(f"{prefix}item.checks")


def test_queue_depth_is_left_out_when_redis_does_not_answer(stack):
    settings = stack.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    families = {family.name: family for family in ScrapeTimeCollector(settings).collect()}
    assert families["item_queue_depth"].samples == []  # absent, so ItemQueueDepthMissing can fire
    assert "item_checks_stuck" in families  # the scrape still answers


def test_exposition_names_and_promtool(stack, worked):
    text = _scrape(stack)
    names = {family.name for family in text_string_to_metric_families(text) if family.name.startswith("item_")}
    exported = {name.removesuffix("_total") for name in METRIC_NAMES}
    assert names <= exported | METRIC_NAMES and {"item_checks", "item_stage_seconds", "item_queue_depth"} <= names
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_log_lines_about_a_check_carry_its_ids(stack, worked):
    worker, rows = worked
    lines = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    done = [line for line in lines if line["message"].startswith("check done")]
    assert {line["check_id"] for line in done} >= set(rows)
    assert all(line["external_id"] and line["stage"] == "store" and line["level"] == "info" for line in done)


def test_health_passes_on_a_working_stack(stack, worked):
    report = json.loads(run_item(stack.env, "health", "--json").stdout)
    assert report["ok"] and all(part["ok"] for part in report["checks"].values())


@pytest.mark.parametrize(
    ("variable", "value", "failing"),
    [
        ("ITEM_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/none", "database"),
        ("ITEM_BROKER_URL", "redis://127.0.0.1:1/0", "broker"),
        ("ITEM_HEAD", "/nonexistent/head.safetensors", "models"),
    ],
)
def test_health_fails_when_a_dependency_is_down(stack, variable, value, failing):
    result = run_item({**stack.env, variable: value}, "health", "--json", check_exit=1)
    report = json.loads(result.stdout)
    assert not report["ok"] and not report["checks"][failing]["ok"]
