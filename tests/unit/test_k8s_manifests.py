"""The Kubernetes manifests of ops/k8s, offline: each overlay rendered by kustomize (kubectl's), every built-in
resource validated against the Kubernetes API schemas (kubernetes-validate, strict: an unknown field fails), the
custom resources (KEDA, Prometheus Operator) against their CRDs' schemas (the @kubernetes-models packages, from
the npm registry), every setting the code reads wired in item.env or named there as a secret or as not needed,
and the numbers that must agree across files (GPU loops and GPUs, KEDA's target and batch size, the grace period
and the batch budget, KEDA's queries and `item backlog --keda-query`)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from worker.cli.main import app as item
from worker.gpu.processes import STOP_GRACE_S
from worker.ledger.backlog import keda_queries
from worker.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "ops" / "k8s"
OVERLAYS = ("gpu", "cpu")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest release still widely run, and the newest the schemas know
CRD_MODELS = ("@kubernetes-models/keda@2.0.0", "@kubernetes-models/prometheus-operator@6.0.0", "typescript@5")
# Where each custom kind's TypeScript interface is: the compiler refuses a field the CRD does not have, which the
# packages' JSON-schema validators let through (as the API server, asked with kubectl's strict validation, would not).
CRD_TYPES = {
    "ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
    "TriggerAuthentication": "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication",
    "ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
}
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
SETTING_LINE = re.compile(r"^#?\s*(ITEM_[A-Z0-9_]+)[=:]")
NOT_NEEDED = re.compile(r"^# not needed: (ITEM_[A-Z0-9_]+): \S")
SECRET = re.compile(r"^# (ITEM_[A-Z0-9_]+): in the Secret item-secrets")


def render(overlay: str) -> list[dict]:
    """The overlay's resources, as `kubectl apply -k` would send them (a fresh copy each call)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (whose kustomize renders the overlays) is not installed")
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


@functools.cache
def _rendered(overlay: str) -> str:
    done = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def base_files() -> list[dict]:
    """The base's resources as written: plain manifests, valid without kustomize."""
    listed = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / "base" / name).read_text()) if doc]


def find(resources: list[dict], kind: str, name: str) -> dict:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"].startswith(name)]
    return found


def env_file(path: Path) -> dict[str, str]:
    lines = (line for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return dict(line.split("=", 1) for line in lines)


def container(deployment: dict, name: str) -> dict:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_in_resources_are_valid_kubernetes(rendered, version):
    import kubernetes_validate

    overlay, resources = rendered
    for resource in resources:
        if not resource["apiVersion"].startswith(CUSTOM_GROUPS):
            kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_base_files_are_valid_kubernetes_as_written(version):
    """Without kubectl too: the base's files are whole manifests, whatever the overlays do to them."""
    import kubernetes_validate

    for resource in base_files():
        kubernetes_validate.validate(resource, version, strict=True)


def test_a_misspelt_field_fails_validation():
    import kubernetes_validate

    deployment = find(base_files(), "Deployment", "item-gpu-worker")
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def crd_validator(tmp_path_factory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    folder = tmp_path_factory.mktemp("crd-models")
    installed = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", *CRD_MODELS],
                               cwd=folder, capture_output=True, text=True, timeout=300)  # fmt: skip
    if installed.returncode != 0:
        pytest.skip(f"npm could not install {CRD_MODELS}: {installed.stderr[-500:]}")
    script = folder / "validate_crds.mjs"
    shutil.copy(Path(__file__).parent / "k8s" / "validate_crds.mjs", script)
    return script


def validate_custom(script: Path, resources: list[dict]) -> dict[str, str]:
    """{kind/name: "ok" or what is wrong}: values against the CRD's schema, and fields against its type."""
    done = subprocess.run(["node", str(script)], input=json.dumps(resources), capture_output=True, text=True,
                          cwd=script.parent, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name, problem in type_check(script.parent, resources).items():
        results[name] = problem if results[name] == "ok" else f"{results[name]}; {problem}"
    return results


def type_check(folder: Path, resources: list[dict]) -> dict[str, str]:
    """What TypeScript's compiler finds wrong with each resource, checked as its kind's interface: one line each,
    so an error's line names its resource."""
    imports = [f'import type {{ I{kind} }} from "{module}";' for kind, module in CRD_TYPES.items()]
    lines = [f"export const r{i}: I{r['kind']} = {json.dumps(r)};" for i, r in enumerate(resources)]
    (folder / "resources.ts").write_text("\n".join(imports + lines) + "\n")
    tsc = [str(folder / "node_modules" / ".bin" / "tsc"), "--noEmit", "--strict", "--skipLibCheck",
           "--module", "nodenext", "--moduleResolution", "nodenext", "resources.ts"]  # fmt: skip
    done = subprocess.run(tsc, cwd=folder, capture_output=True, text=True, timeout=120)
    problems: dict[str, str] = {}
    for match in re.finditer(r"^resources\.ts\((\d+),\d+\): (.*)$", done.stdout, re.MULTILINE):
        resource = resources[int(match.group(1)) - 1 - len(imports)]
        problems[f"{resource['kind']}/{resource['metadata']['name']}"] = match.group(2)
    assert problems or done.returncode == 0, done.stdout + done.stderr
    return problems


def test_custom_resources_are_valid_against_their_crds(crd_validator):
    resources = [r for r in render("gpu") if r["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert {r["kind"] for r in resources} == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
    assert validate_custom(crd_validator, resources) == {f"{r['kind']}/{r['metadata']['name']}": "ok"
                                                         for r in resources}  # fmt: skip


def test_a_wrong_custom_resource_fails_validation(crd_validator):
    scaler = find(render("gpu"), "ScaledObject", "item-gpu-worker")
    scaler["spec"]["triggers"][0]["metadata"]["targetQueryValue"] = 32  # KEDA's metadata values are strings
    misspelt = find(render("gpu"), "ServiceMonitor", "item-workers")
    misspelt["spec"]["endpoints"][0]["scrapeTimeOut"] = "10s"
    found = validate_custom(crd_validator, [scaler, misspelt])
    assert "must be string" in found["ScaledObject/item-gpu-worker"]
    assert "scrapeTimeOut" in found["ServiceMonitor/item-workers"]


# ------------------------------------------------------------------ settings


def test_every_setting_is_wired_in_item_env_or_named_as_secret_or_not_needed():
    lines = (K8S / "base" / "item.env").read_text().splitlines()
    named = {
        m.group(1) for line in lines for pattern in (SETTING_LINE, NOT_NEEDED, SECRET) if (m := pattern.match(line))
    }
    settings = {f"ITEM_{name.upper()}" for name in Settings.model_fields}
    assert settings - named == set(), "settings missing from ops/k8s/base/item.env"
    assert named - settings == set(), "ops/k8s/base/item.env names settings the code does not read"


def test_secret_settings_are_keys_of_the_example_secret_and_never_plain_values():
    lines = (K8S / "base" / "item.env").read_text().splitlines()
    secret = {m.group(1) for line in lines if (m := SECRET.match(line))}
    assert {"ITEM_DATABASE_URL", "ITEM_BROKER_URL", "ITEM_CALLBACK_SECRET"} <= secret
    assert secret == set(env_file(K8S / "secrets.example.env"))
    for overlay in OVERLAYS:
        settings = find(render(overlay), "ConfigMap", "item-settings")["data"]
        assert secret.isdisjoint(settings), f"{overlay}: a credential in the ConfigMap"
    assert not [r for o in OVERLAYS for r in render(o) if r["kind"] == "Secret"], "a Secret is never rendered"


def test_each_overlays_settings_load(rendered):
    overlay, resources = rendered
    values = find(resources, "ConfigMap", "item-settings")["data"]
    fields = {f"ITEM_{name.upper()}": name for name in Settings.model_fields}
    loaded = Settings(**{fields[key]: value for key, value in values.items() if key in fields})
    assert loaded.allow_download is False and loaded.metrics_addr == "0.0.0.0"


# ------------------------------------------------------------------ what must agree


def test_gpu_loops_match_gpus_and_the_autoscaler_target_matches_batch_size_times_loops():
    resources = render("gpu")
    worker = container(find(resources, "Deployment", "item-gpu-worker"), "worker")
    env = {e["name"]: e["value"] for e in worker["env"]}
    loops = int(env["ITEM_WORKER_CONCURRENCY"])
    assert loops == int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    settings = find(resources, "ConfigMap", "item-settings")["data"]
    claimable, busy = find(resources, "ScaledObject", "item-gpu-worker")["spec"]["triggers"]
    assert float(claimable["metadata"]["targetQueryValue"]) == int(settings["ITEM_BATCH_SIZE"]) * loops
    assert busy["metadata"]["targetQueryValue"] == "1"
    max_attempts = int(settings.get("ITEM_MAX_ATTEMPTS", Settings.model_fields["max_attempts"].default))
    queries = keda_queries(max_attempts=max_attempts)
    assert (claimable["metadata"]["query"], busy["metadata"]["query"]) == (queries["claimable"], queries["busy"])


def test_the_grace_period_covers_a_batch_budget_and_the_loops_stop():
    for overlay in OVERLAYS:
        resources = render(overlay)
        budget = float(find(resources, "ConfigMap", "item-settings")["data"]["ITEM_BATCH_TIME_BUDGET_S"])
        grace = find(resources, "Deployment", "item-gpu-worker")["spec"]["template"]["spec"]
        assert budget + STOP_GRACE_S + 10 <= grace["terminationGracePeriodSeconds"] <= budget + STOP_GRACE_S + 120


def test_worker_probes_ask_the_metrics_port_and_rollouts_wait_for_readiness(rendered):
    overlay, resources = rendered
    port = int(find(resources, "ConfigMap", "item-settings")["data"]["ITEM_METRICS_PORT"])
    for name, box in (("item-gpu-worker", "worker"), ("item-intake", "intake"), ("item-maintenance", "maintenance")):
        deployment = find(resources, "Deployment", name)
        pod = container(deployment, box)
        assert {p["name"]: p["containerPort"] for p in pod["ports"]} == {"metrics": port}
        assert pod["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert pod["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert "startupProbe" not in pod  # a model load of any length must not get a worker killed
        if deployment["spec"].get("strategy", {}).get("type") == "RollingUpdate":
            assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_command_in_the_manifests_is_an_item_command_it_accepts():
    commands = set()
    for overlay in OVERLAYS:
        for resource in render(overlay):
            spec = resource.get("spec", {}).get("template", {}).get("spec", {})
            for box in (*spec.get("initContainers", []), *spec.get("containers", [])):
                assert "command" not in box, "`command:` would replace the image's entrypoint, tini (PID 1)"
                commands.add(tuple(box["args"]))
    assert {c[:3] for c in commands} >= {("item", "worker", "--no-intake"), ("item", "db", "upgrade")}
    for command in commands:
        assert command[0] == "item"
        result = CliRunner().invoke(item, [*command[1:], "--help"])
        assert result.exit_code == 0, f"{' '.join(command)}: {result.output}"


def test_only_gpu_workers_ask_for_gpus_and_the_cpu_overlay_asks_for_none():
    for overlay in OVERLAYS:
        for resource in render(overlay):
            for box in resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                asks = "nvidia.com/gpu" in box.get("resources", {}).get("limits", {})
                assert asks == (overlay == "gpu" and resource["metadata"]["name"] == "item-gpu-worker")


def test_prometheus_scrapes_workers_under_the_job_the_alerts_read():
    resources = render("gpu")
    alerts = (K8S.parent / "prometheus" / "alerts.yml").read_text()
    for monitor, job in (("item-workers", "item-worker"), ("item-api", "item-api")):
        spec = find(resources, "ServiceMonitor", monitor)["spec"]
        [service] = [r for r in resources if r["kind"] == "Service"
                     and spec["selector"]["matchLabels"].items() <= r["metadata"]["labels"].items()]  # fmt: skip
        assert service["metadata"]["labels"][spec["jobLabel"]] == job
    assert 'job="item-worker"' in alerts
