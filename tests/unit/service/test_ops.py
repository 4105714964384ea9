"""The operations folder agrees with the code: alerts and dashboard panels query only metrics that
`worker.ops.metrics` defines, every alert has a severity, a summary and a runbook section that exists, the compose
file sets only settings that exist. With `promtool` on PATH, Prometheus itself checks the rules, runs their unit
tests (ops/prometheus/*.test.yml), checks the config and parses every dashboard query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prometheus_client.metrics import MetricWrapperBase

from worker.ops import metrics
from worker.ops.metrics import METRIC_NAMES
from worker.settings import Settings

yaml = pytest.importorskip("yaml")

OPS = Path(__file__).resolve().parents[3] / "ops"
ALERTS = OPS / "prometheus" / "alerts.yml"
PROMETHEUS = OPS / "prometheus" / "prometheus.yml"
RUNBOOK = OPS / "RUNBOOK.md"
DASHBOARD = OPS / "grafana" / "dashboards" / "item.json"
COMPOSE = OPS / "compose.yaml"
RULE_TESTS = sorted((OPS / "prometheus").glob("*.test.yml"))

SEVERITIES = {"critical", "warning", "info"}
SERVICES = {"postgres", "redis", "migrate", "worker-gpu", "worker-cpu", "prometheus", "grafana"}
ITEM_IDENTIFIER = re.compile(r"\bitem_[A-Za-z0-9_]*")
# Grafana's variables, replaced by something Prometheus parses when promtool checks the panels' queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$pipeline_version": ".*"}


def _histograms() -> set[str]:
    return {
        family.name
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
        if family.type == "histogram"
    }


def _series_names() -> set[str]:
    """What Prometheus stores: a histogram only as its _bucket, _sum and _count series."""
    histograms = _histograms()
    suffixed = {f"{name}{suffix}" for name in histograms for suffix in ("_bucket", "_sum", "_count")}
    return (METRIC_NAMES - histograms) | suffixed


def _unknown_metrics(expr: str) -> set[str]:
    return set(ITEM_IDENTIFIER.findall(expr)) - _series_names()


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict]:
    return [rule for group in _load(ALERTS)["groups"] for rule in group["rules"]]


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included, rows themselves left out."""
    found = []
    for panel in dashboard["panels"]:
        found.extend(_panels(panel) if panel["type"] == "row" else [panel])
    return found


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in _panels(dashboard) for target in panel["targets"]]


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _runbook_anchors() -> set[str]:
    anchors, in_code = set(), False
    for line in RUNBOOK.read_text().splitlines():
        in_code ^= line.lstrip().startswith("```")  # a `# comment` in a code block is no heading
        if not in_code and re.match(r"#{1,6} ", line):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


# ---------------------------------------------------------------------------------------------- metric names


def test_the_metric_names_of_the_code_are_known_here():
    # given the metrics module, when its histograms are listed, then they are the histograms of METRIC_NAMES
    assert _histograms() <= METRIC_NAMES
    assert {"item_score", "item_check_latency_seconds", "item_stage_seconds"} <= _histograms()


def test_the_name_check_catches_a_wrong_name():
    assert _unknown_metrics('sum(rate(item_checks_total{status="done"}[5m])) / up') == set()
    assert _unknown_metrics("rate(item_score_count[1h]) + item_checks") == {"item_checks"}
    assert _unknown_metrics("item_score") == {"item_score"}  # a histogram has no series of its bare name


def test_alert_expressions_use_only_defined_metrics():
    unknown = {rule["alert"]: _unknown_metrics(rule["expr"]) for rule in _rules()}
    assert {alert: names for alert, names in unknown.items() if names} == {}


def test_dashboard_queries_use_only_defined_metrics():
    unknown = {title: _unknown_metrics(expr) for title, expr in _dashboard_exprs()}
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in variables:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        unknown[f"variable {variable['name']}"] = _unknown_metrics(query)
    assert {title: names for title, names in unknown.items() if names} == {}


def test_every_metric_has_a_panel():
    used = {name for _, expr in _dashboard_exprs() for name in ITEM_IDENTIFIER.findall(expr)}
    used |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert METRIC_NAMES - used == set()


# ---------------------------------------------------------------------------------------------- alerts


def test_every_alert_has_expr_severity_summary_and_runbook():
    rules = _rules()
    assert rules
    for rule in rules:
        assert rule.get("alert"), rule
        assert rule.get("expr", "").strip(), rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        assert rule.get("annotations", {}).get("summary", "").strip(), rule["alert"]
        assert rule["annotations"].get("runbook_url"), rule["alert"]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"


def test_every_runbook_url_points_at_a_runbook_section():
    anchors = _runbook_anchors()
    for rule in _rules():
        url = urlsplit(rule["annotations"]["runbook_url"])
        assert url.path.endswith("RUNBOOK.md"), rule["alert"]
        assert url.fragment in anchors, f"{rule['alert']}: no heading for #{url.fragment} in {RUNBOOK.name}"


def test_the_runbook_covers_scaling_and_its_links_resolve():
    anchors = _runbook_anchors()
    assert "scaling" in anchors
    links = set(re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()))
    assert links - anchors == set()


def test_the_alerts_asked_for_exist():
    rules = {rule["alert"]: rule["expr"] for rule in _rules()}
    expected_metrics = {
        "ItemQueueBacklog": "item_checks_waiting",
        "ItemIntakeBehind": "item_queue_depth",
        "ItemDeadLetters": "item_dead_letters_total",
        "ItemErrorRateHigh": "item_checks_total",
        "ItemChecksFailed": "item_checks_total",
        "ItemChecksStuck": "item_checks_stuck",
        "ItemFakeRateDrift": "item_flagged_total",
        "ItemWorkerDown": "up",
        "ItemNoWorkerReady": "item_worker_ready",
        "ItemChecksSlow": "item_check_latency_seconds_bucket",
        "ItemRescoreBacklogStalled": "item_checks_waiting",
        "ItemDeliveriesFailing": "item_deliveries_total",
    }
    for alert, metric in expected_metrics.items():
        assert re.search(rf"\b{metric}\b", rules.get(alert, "")), alert


def test_every_alert_has_a_promtool_test_case():
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for group in _load(path)["tests"]
        for case in group.get("alert_rule_test", [])
    }
    assert {rule["alert"] for rule in _rules()} - tested == set()


def test_prometheus_scrapes_the_workers_and_loads_the_rules():
    config = _load(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_job = jobs["item-worker"]  # the job the alerts name: up{job="item-worker"}
    assert all('job="item-worker"' in rule["expr"] for rule in _rules() if re.search(r"\bup\b", rule["expr"]))
    ports = {sd["port"] for sd in worker_job.get("dns_sd_configs", [])}
    assert ports == {Settings.model_fields["metrics_port"].default}
    assert worker_job.get("metrics_path", "/metrics") == "/metrics"
    # compose mounts alerts.yml where rule_files looks
    mounted = [v.split(":")[1] for v in _load(COMPOSE)["services"]["prometheus"]["volumes"] if "alerts.yml" in v]
    assert mounted and any(fnmatch(mounted[0], pattern) for pattern in config["rule_files"])


# ---------------------------------------------------------------------------------------------- dashboard


def test_the_dashboard_parses_and_every_panel_queries_something():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dashboard["templating"]["list"])
    panels = _panels(dashboard)
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel.get("targets"), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_matches_compose():
    datasources = _load(OPS / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [source["type"] for source in datasources] == ["prometheus"]
    assert datasources[0]["url"].startswith("http://prometheus:")
    providers = _load(OPS / "grafana" / "provisioning" / "dashboards" / "item.yml")["providers"]
    grafana_volumes = _load(COMPOSE)["services"]["grafana"]["volumes"]
    dashboard_mount = next(v.split(":")[1] for v in grafana_volumes if v.startswith("./grafana/dashboards"))
    assert providers[0]["options"]["path"] == dashboard_mount


# ---------------------------------------------------------------------------------------------- compose


def test_compose_has_the_services_and_sets_only_real_settings():
    compose = _load(COMPOSE)
    services = compose["services"]
    assert set(services) >= SERVICES
    settings = {f"ITEM_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        unknown = {key for key in service.get("environment", {}) if key.startswith("ITEM_")} - settings
        assert unknown == set(), f"{name} sets settings that do not exist: {unknown}"
    worker_env = services["worker-gpu"]["environment"]
    for key in ("ITEM_DATABASE_URL", "ITEM_BROKER_URL", "ITEM_PROFILE", "ITEM_MODEL_DIR", "ITEM_HEAD"):
        assert key in worker_env, key
    assert str(worker_env["ITEM_METRICS_PORT"]) == str(Settings.model_fields["metrics_port"].default)


def test_compose_workers_run_the_item_commands():
    services = _load(COMPOSE)["services"]
    assert services["migrate"]["command"][:3] == ["item", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker-gpu", "worker-cpu"):
        assert services[name]["command"][:2] == ["item", "worker"], name
        assert services[name]["healthcheck"]["test"][1:3] == ["item", "health"], name
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert services["worker-cpu"]["environment"]["ITEM_DEVICE"] == "cpu"
    assert "cpu" in services["worker-cpu"]["profiles"]
    assert "healthcheck" in services["postgres"]


def test_compose_files_exist():
    services = _load(COMPOSE)["services"]
    build = services["worker-gpu"]["build"]
    assert (OPS / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("./"):
                assert (OPS / volume.split(":")[0]).exists(), volume


# ---------------------------------------------------------------------------------------------- promtool


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_runs_the_rule_tests():
    assert RULE_TESTS
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_config():
    result = _promtool("check", "config", "--syntax-only", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_the_dashboard_queries(tmp_path):
    rules = []
    for i, (title, expr) in enumerate(_dashboard_exprs()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{title}: a Grafana variable promtool cannot stand in for"
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_workers_long_lived_threads_are_counted_alive_or_dead():
    import threading

    from worker.ops.exporter import thread_liveness

    stop = threading.Event()
    deliverer = threading.Thread(target=stop.wait, name="item-deliverer", daemon=True)
    deliverer.start()
    try:
        alive = {sample.labels["thread"]: sample.value for sample in thread_liveness().samples}
        assert alive == {"gpu_supervisor": 0, "deliverer": 1, "reconciler": 0, "metrics": 0, "tenant_queues": 0}
    finally:
        stop.set()
        deliverer.join()
    assert {s.labels["thread"]: s.value for s in thread_liveness().samples}["deliverer"] == 0  # dead, and seen so
