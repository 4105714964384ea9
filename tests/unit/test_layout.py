"""The house plan, checked on every run: layers import only downwards, and no module imports one that imports it.

Read from the source (every `import` and `from ... import`, those inside functions too), so a lazy import that
would close a circle counts like any other.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "worker", "migrations")
SERVICE_LIBRARIES = ("celery", "kombu", "sqlalchemy", "alembic", "psycopg", "redis", "boto3", "prometheus_client")


def _name_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_name_of(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imported_names(name: str) -> set[str]:
    """Every dotted name the module imports, relative imports made absolute."""
    path = _modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _project_module(dotted: str) -> str | None:
    """The project module a dotted name lives in (`pipeline.core.head.Head` → `pipeline.core.head`), if any."""
    while dotted and dotted not in _modules():
        dotted = dotted.rpartition(".")[0]
    return dotted or None


@cache
def _edges() -> dict[str, frozenset[str]]:
    edges = {}
    for name in _modules():
        targets = {_project_module(dotted) for dotted in _imported_names(name)}
        # Importing a submodule runs its package's __init__ first; that is not the package importing back.
        edges[name] = frozenset(t for t in targets if t and t != name and not name.startswith(f"{t}."))
    return edges


def _reachable(start: str) -> set[str]:
    seen, todo = set(), list(_edges()[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_edges()[module])
    return seen


def test_no_module_imports_one_that_imports_it():
    reach = {name: _reachable(name) for name in _modules()}
    circles = {frozenset({a, *(b for b in reach[a] if a in reach[b])}) for a in reach if a in reach[a]}
    assert sorted(sorted(circle) for circle in circles) == []


def test_the_detector_core_never_imports_the_lab_or_the_service():
    offending = {
        name: sorted(target for target in _edges()[name] if not target.startswith("pipeline.core"))
        for name in _modules()
        if name.startswith("pipeline.core")
    }
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_the_pipeline_knows_nothing_of_the_service():
    offending = {}
    for name in _modules():
        if name.startswith("pipeline"):
            roots = {dotted.split(".")[0] for dotted in _imported_names(name)}
            bad = sorted(roots & {"worker", *SERVICE_LIBRARIES})
            if bad:
                offending[name] = bad
    assert offending == {}


def test_the_graph_sees_the_imports_it_checks():
    # The checks above mean something only if the graph is read right: known edges must be found.
    assert "pipeline.core.detector" in _edges()["worker.gpu.build"]
    assert "worker.gpu.step" in _edges()["worker.intake.app"]
    assert "pipeline.core.model_store" in _edges()["pipeline.core.detector"]
    assert "pipeline.core.tiny" in _edges()["pipeline.core.model_store"]  # a lazy import, inside a function
    assert "worker.cli.common" in _edges()["worker.cli.checks"]


GPU_MODEL_SIDE = ("worker.gpu.batches", "worker.gpu.build", "worker.gpu.loop", "worker.gpu.embedded")
MAX_MODULE_LINES = 500


def test_the_way_in_and_out_never_imports_the_model_side():
    # Intake, sources, outbox and the web files rows and reads them: an intake-only worker or `item serve` must
    # start without the models' code (the Celery app reaches the GPU step only to start processes).
    offending = {
        name: sorted(set(_edges()[name]) & set(GPU_MODEL_SIDE))
        for name in _modules()
        if name.startswith(("worker.intake", "worker.sources", "worker.outbox", "worker.web"))
    }
    assert {name: targets for name, targets in offending.items() if targets} == {}


def test_the_house_has_folders_by_the_path_of_a_check():
    for folder in ("intake", "gpu", "sources", "outbox", "ops", "ledger", "web", "cli"):
        assert f"worker.{folder}" in _modules(), folder
    flat = sorted(
        name for name, path in _modules().items() if name.count(".") == 1 and name.startswith("worker.")
        and path.name != "__init__.py"
    )  # fmt: skip
    assert len(flat) <= 6, flat  # a handful of modules beside the folders: settings, codes, ...


def test_no_module_is_too_long_to_read():
    lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}
