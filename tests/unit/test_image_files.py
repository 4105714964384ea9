"""The worker image's files, read statically (no builder, no network): ops/Dockerfile, its .dockerignore, and how
compose builds it; and the import check behind installing the package without the `lab` extra.

The image is built for real on demand: `python -m tests.bench.build_image`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "ops" / "Dockerfile"
DOCKERIGNORE = ROOT / "ops" / "Dockerfile.dockerignore"
COMPOSE = ROOT / "ops" / "compose.yaml"
CONSTRAINTS = ROOT / "constraints.txt"
LAB_MODULES = ("scipy", "sklearn", "matplotlib")


# --- a small Dockerfile reader -----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    assert not pending, "a continuation line at the end of the file"
    return result


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (from its FROM to the next), without the global ARGs before the first."""
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"not the exec (JSON array) form: {rest}"
    return value


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every `pip install` in the stage's RUN instructions."""
    commands = []
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for piece in re.split(r"&&|;|\|\|", rest):
            words = shlex.split(piece.replace("\n", " "), posix=True) if piece.count("'") % 2 == 0 else piece.split()
            for i, word in enumerate(words):
                if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                    commands.append(words[i + 2 :])
    return commands


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_reader_joins_continuations_and_drops_comments():
    parsed = instructions('# c\nARG A=1\nRUN a \\\n    && b\n# d\nCMD ["x"]\n')
    assert parsed == [("ARG", "A=1"), ("RUN", "a  && b"), ("CMD", '["x"]')]
    assert pip_installs([("RUN", "x/pip install -c c.txt '.[lab]' && pip install --upgrade pip")]) == [
        ["-c", "c.txt", ".[lab]"],
        ["--upgrade", "pip"],
    ]


# --- the base ----------------------------------------------------------------------------------------------------


def test_every_stage_starts_from_the_base_image_argument(dockerfile):
    before_first_from = []
    for keyword, rest in dockerfile:
        if keyword == "FROM":
            break
        before_first_from.append((keyword, rest))
    args = dict(rest.partition("=")[::2] for keyword, rest in before_first_from if keyword == "ARG")
    assert "BASE_IMAGE" in args, "the base is a build argument declared before the first FROM"
    froms = [rest.split()[0] for keyword, rest in dockerfile if keyword == "FROM"]
    assert len(froms) == 2, froms
    # Both stages on the same base: the environment built in the first runs the base's Python in the second.
    assert all(base in ("${BASE_IMAGE}", "$BASE_IMAGE") for base in froms), froms


def test_the_default_base_is_a_pytorch_cuda_runtime_with_torch_2_6_or_newer(dockerfile):
    default = next(rest.partition("=")[2] for keyword, rest in dockerfile if keyword == "ARG" and "BASE_IMAGE" in rest)
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn(\d+)-runtime", default)
    assert match, f"the default base should be a tag of PyTorch's CUDA runtime images: {default}"
    assert (int(match[1]), int(match[2])) >= (2, 6), "transformers 5 needs torch 2.6 or newer"
    # The documented alternatives are named in the file, for whoever changes the argument.
    text = DOCKERFILE.read_text()
    assert "python:3.11-slim" in text and "TORCH_INDEX_URL" in text


# --- torch is the base's, or installed first; the package never moves it -------------------------------------------


def constraints_filter(dockerfile) -> str:
    """The `grep -v -E '...' constraints.txt` that derives the image's constraints."""
    build = stages(dockerfile)[0]
    for keyword, rest in build:
        found = re.search(r"grep -v -E '([^']+)' constraints\.txt\s*> (\S+)", rest) if keyword == "RUN" else None
        if found:
            return found[1], found[2]
    raise AssertionError("the build stage derives no constraints from constraints.txt")


def apply_filter(pattern: str, text: str) -> list[str]:
    done = subprocess.run(["grep", "-v", "-E", pattern], input=text, capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.splitlines()


def test_the_image_constraints_are_constraints_txt_without_torch_and_torchvision(dockerfile):
    pattern, _ = constraints_filter(dockerfile)
    lines = CONSTRAINTS.read_text().splitlines()
    kept = apply_filter(pattern, CONSTRAINTS.read_text())
    pinned = [line for line in lines if re.match(r"\s*(torch|torchvision)\s*(==|>=|<=|~=|!=|<|>|@|;|\[)", line)]
    assert pinned, "constraints.txt pins torch and torchvision for CI: this test expects to see them go"
    assert kept == [line for line in lines if line not in pinned]
    # Written every other way a constraints file may name them; their neighbours by prefix stay.
    other_forms = ["torch>=2.6", " torch == 2.14.1", "torchvision<1", "torch @ https://example/t.whl", "torch; os_name"]
    assert apply_filter(pattern, "\n".join(other_forms)) == []
    neighbours = ["torchaudio==2.9.0", "torch-geometric==2.6", "torchmetrics>=1", "pytest-xdist==3.8.0", "# torch"]
    assert apply_filter(pattern, "\n".join(neighbours)) == neighbours


def test_the_package_is_installed_without_extras_under_the_image_constraints(dockerfile):
    _, derived = constraints_filter(dockerfile)
    installs = [args for stage in stages(dockerfile) for args in pip_installs(stage)]
    package = [args for args in installs if "." in args or any(a.startswith(".[") for a in args)]
    assert len(package) == 1, f"one install of the package itself: {installs}"
    args = package[0]
    assert "." in args and not any("[" in a for a in args), f"no extras (no [lab], no [dev]): {args}"
    constraint_files = [args[i + 1] for i, a in enumerate(args) if a in ("-c", "--constraint")]
    assert constraint_files == [derived], f"the package is installed under the derived constraints only: {args}"
    text = DOCKERFILE.read_text()
    assert "[lab]" not in re.sub(r"#.*", "", text) and "[dev]" not in re.sub(r"#.*", "", text)


def test_the_derived_constraints_pin_the_torch_in_the_environment(dockerfile):
    _, derived = constraints_filter(dockerfile)
    runs = " ".join(rest for keyword, rest in stages(dockerfile)[0] if keyword == "RUN")
    # The torch and torchvision installed (the base's, or the ones just installed) are appended to the file as pins.
    appended = re.search(r"m\.version\(n\)\}\" for n in \(\"torch\", \"torchvision\"\)\).*?>> ([^\s;]+)", runs)
    assert appended and appended[1] == derived
    # Without torch in the base, it comes from TORCH_INDEX_URL at constraints.txt's versions, before the package.
    torch_install = next(args for args in pip_installs(stages(dockerfile)[0]) if "torch" in args)
    assert "--index-url" in torch_install and "${TORCH_INDEX_URL}" in torch_install
    assert torch_install[torch_install.index("-c") + 1] == "constraints.txt"
    # A base that ships torch keeps it: the environment sees the base's packages.
    assert "--system-site-packages" in runs


# --- the running image -------------------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user(dockerfile):
    final = stages(dockerfile)[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final[last_user:]), "nothing runs as root after USER"
    uid = next(rest.partition("=")[2] for keyword, rest in final if keyword == "ARG" and rest.startswith("UID"))
    assert int(uid) > 0
    user = re.escape(users[-1].split(":")[0])
    assert any(re.search(rf"useradd [^;&]*\b{user}\b", rest) for keyword, rest in final if keyword == "RUN")


def test_tini_is_pid_1_and_the_command_is_an_item_command(dockerfile):
    final = stages(dockerfile)[-1]
    entrypoint = exec_form(next(rest for keyword, rest in reversed(final) if keyword == "ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini" and entrypoint[-1] == "--", entrypoint
    assert any("tini" in rest for keyword, rest in final if keyword == "RUN"), "tini is installed where missing"
    cmd = exec_form(next(rest for keyword, rest in reversed(final) if keyword == "CMD"))
    assert cmd[0] == "item", cmd
    # compose runs its own init in front (`init: true`): tini then registers as a subreaper instead of warning.
    assert env_values(final).get("TINI_SUBREAPER") == "1"


def test_metrics_models_and_port(dockerfile):
    final = stages(dockerfile)[-1]
    env = env_values(final)
    assert env["ITEM_METRICS_ADDR"] == "0.0.0.0"
    assert env["ITEM_METRICS_PORT"] == "9808"
    assert env["ITEM_MODEL_DIR"] == "/models"
    assert env["PATH"].startswith("/opt/item/bin:")
    assert ("EXPOSE", "9808") in final
    assert any(keyword == "VOLUME" and "/models" in exec_form(rest) for keyword, rest in final)
    assert any(keyword == "COPY" and rest == "--from=build /opt/item /opt/item" for keyword, rest in final)


# --- the build context and compose ---------------------------------------------------------------------------------


def test_every_copied_path_is_in_the_build_context(dockerfile):
    allowed = {line[1:].strip() for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert "*" in [line.strip() for line in DOCKERIGNORE.read_text().splitlines()], "everything else stays out"
    copied = set()
    for keyword, rest in dockerfile:
        if keyword == "COPY" and not rest.startswith("--from"):
            copied.update(rest.split()[:-1])
    assert copied, "the Dockerfile copies from the context"
    assert copied <= allowed, f"copied but ignored by {DOCKERIGNORE.name}: {sorted(copied - allowed)}"
    assert all((ROOT / path).exists() for path in copied)


def test_compose_builds_this_file_with_arguments_it_declares(dockerfile):
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load(COMPOSE.read_text())
    builds = [service["build"] for service in compose["services"].values() if "build" in service]
    assert builds, "compose builds the image"
    declared = {rest.partition("=")[0] for keyword, rest in dockerfile if keyword == "ARG"}
    for build in builds:
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "ops/Dockerfile"
        args = build.get("args") or {}
        names = [a.partition("=")[0] for a in args] if isinstance(args, list) else list(args)
        assert set(names) <= declared, f"compose passes build arguments the Dockerfile does not declare: {names}"


# --- nothing the image runs imports the lab's packages -------------------------------------------------------------

# Run in a fresh interpreter, where the lab's packages are made absent as they are in the image: every finder on
# sys.meta_path is wrapped so that it finds none of them (`import scipy` raises ModuleNotFoundError, and a library's
# probe, `importlib.util.find_spec("sklearn")` as torch._dynamo makes, answers None), and a finder ahead of them
# records each import of one, even an import a module catches. Then the CLI's entry and every module of `worker`
# and `pipeline.core` are imported: the commands the image runs (`item worker`, `health`, `serve`, `db upgrade`,
# `backlog`) import theirs inside the command, from these packages.
BLOCKED_IMPORTS = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    BLOCKED = set(sys.argv[1].split(","))
    attempts = []

    def blocked(name):
        return name.partition(".")[0] in BLOCKED

    class Absent:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            return None if blocked(name) else self.finder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)

    class Record:
        def find_spec(self, name, path=None, target=None):
            caller = sys._getframe(2).f_code.co_name  # importlib's _find_spec called by an import, or by a probe
            if blocked(name) and caller == "_find_and_load_unlocked":
                attempts.append(name)
            return None

    sys.meta_path[:] = [Record()] + [Absent(finder) for finder in sys.meta_path]
    failed = {}
    names = ["worker.cli.main"] + sys.argv[2].split(",")
    for package in sys.argv[3].split(","):
        if package:
            root = importlib.import_module(package)
            # __main__ modules run the command line when imported: no module the image imports.
            walked = pkgutil.walk_packages(root.__path__, package + ".")
            names += [info.name for info in walked if not info.name.endswith(".__main__")]
    for name in names:
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as error:
            failed[name] = f"{type(error).__name__}: {error}"
    print(json.dumps({"imported": len(names), "attempts": attempts, "failed": failed}))
    """
)


def import_with_lab_blocked(modules=(), packages=("worker", "pipeline.core"), extra_path=None) -> dict:
    env = None
    if extra_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(extra_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS, ",".join(LAB_MODULES), ",".join(modules), ",".join(packages)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_worker_and_the_core_import_nothing_of_the_lab():
    report = import_with_lab_blocked()
    assert report["imported"] > 50, report
    assert report["attempts"] == [], f"imported at import time, but not in the image: {report['attempts']}"
    # `worker.hma` plugs into threatexchange (the `hma` extra), which the image leaves out too; nothing else may fail.
    assert set(report["failed"]) <= {"worker.hma"}, report["failed"]


def test_the_check_fails_for_a_module_that_imports_the_lab(tmp_path):
    (tmp_path / "uses_sklearn.py").write_text("try:\n    import sklearn.metrics\nexcept ImportError:\n    pass\n")
    (tmp_path / "needs_scipy.py").write_text("from scipy import stats\n")
    (tmp_path / "probes.py").write_text(
        "import importlib.util\nassert importlib.util.find_spec('matplotlib') is None\n"
    )
    modules = ("uses_sklearn", "needs_scipy", "probes")
    report = import_with_lab_blocked(modules=modules, packages=(), extra_path=tmp_path)
    assert report["attempts"] == ["sklearn", "scipy"]
    assert set(report["failed"]) == {"needs_scipy"}
    assert "ModuleNotFoundError" in report["failed"]["needs_scipy"]
    # A probe that finds the package absent is what a library does when the extra is missing: not an import.
    assert "probes" not in report["failed"]
