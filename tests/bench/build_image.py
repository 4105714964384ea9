"""Build the worker image from ops/Dockerfile with podman (buildah) on this machine and run `item` in it.

Run on demand, never in the test run (the unit tests read ops/Dockerfile statically: tests/unit/test_image_files.py):
    python -m tests.bench.build_image [--keep] [--rebuild-base] [--json]

Needs root, podman (Debian's `podman`, which builds with buildah's code) and debootstrap. No registry serves images
here, so the base is made locally: a Debian bookworm root filesystem (debootstrap: Python 3.11, python3-venv,
ca-certificates; no torch, no tini, no compiler: the Dockerfile installs what a base lacks, as it does on
python:3.11-slim), imported as localhost/item-base:bookworm and kept for the next run. The image is then built with
BASE_IMAGE set to it, so it takes the Dockerfile's path for a base without torch: torch and torchvision from
TORCH_INDEX_URL at constraints.txt's versions. PyTorch's CPU index is unreachable from here; this machine's own
index of torch's wheels (/opt/pypi-more/simple, bind-mounted into the build) serves them, PyPI the rest. Then, in the
image, with --network host against this machine's Postgres and Redis:
  - who runs (not root), PID 1 (tini), torch's version, and that scipy, scikit-learn and matplotlib are absent;
  - `item db upgrade` into a scratch database made for the run (and dropped after), then `item health --json`:
    database, migrations and broker must be ok; the models check fails, as no models are mounted at /models;
  - SIGTERM reaches the command through tini: `podman stop` ends a process waiting on it at once.
Prints the timings, the image's size and the health report; exits 1 if any step fails. The built image is removed
afterwards unless --keep; the build keeps no intermediate images unless --layers.

Two settings of this sandbox are worked around, not the image's business: podman's default rlimits (nofile and nproc
raised to their maximum) need CAP_SYS_RESOURCE, which this root lacks, so both are set below the current limits;
and crun refuses cgroups in hybrid mode (v1 controllers plus a v2 hierarchy with hugetlb), so runc runs the
containers when it is installed (Debian's `runc`). The machine's TLS proxy signs with its own CA: the host's
bundle is mounted into the build and named to pip with the Dockerfile's PIP_CERT argument.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/item-base:bookworm"
IMAGE = "localhost/item-moderation:image-check"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
MIRROR = "http://deb.debian.org/debian"
LOCAL_TORCH_INDEX = Path("/opt/pypi-more/simple")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
POSTGRES = os.environ.get("ITEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("ITEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LAB = ("scipy", "sklearn", "matplotlib")


class StepFailed(Exception):
    pass


def run(command: list[str], *, timeout: float, stdin=None, check: bool = True, quiet: bool = False, log=None):
    if not quiet:
        print("$", " ".join(command), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if log is not None:
        log.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if check and done.returncode != 0:
        raise StepFailed(f"{command[0]} {command[1]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return done


def podman_flags() -> list[str]:
    return ["--runtime", "runc"] if shutil.which("runc") else []


def ulimits() -> list[str]:
    import resource

    flags = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, _ = resource.getrlimit(limit)
        value = 16384 if soft == resource.RLIM_INFINITY else min(soft - 1, 16384)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], timeout=60, check=False, quiet=True).returncode == 0


def make_base(log) -> float:
    if not shutil.which("debootstrap"):
        raise StepFailed("debootstrap is not installed (apt-get install -y debootstrap)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="item-base-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs), MIRROR],
            timeout=1200, log=log)  # fmt: skip
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["podman", "import", "-", BASE], stdin=tar.stdout, timeout=600, log=log)
        finally:
            tar.stdout.close()
            tar.wait()
    return time.perf_counter() - start


def build(log, *, layers: bool) -> float:
    args = ["--build-arg", f"BASE_IMAGE={BASE}"]
    volumes = []
    if (LOCAL_TORCH_INDEX / "torch").is_dir():
        # torch's dependencies that the local index lacks (triton, filelock, ...) come from PyPI; on equal versions
        # pip takes the first index's file, the local one.
        index_root = LOCAL_TORCH_INDEX.parent
        volumes += ["-v", f"{index_root}:{index_root}:ro"]
        args += ["--build-arg", f"TORCH_INDEX_URL=file://{LOCAL_TORCH_INDEX}"]
        args += ["--build-arg", "PIP_EXTRA_INDEX_URL=https://pypi.org/simple"]
    if HOST_CA.is_file():
        volumes += ["-v", f"{HOST_CA}:/run/host-ca.crt:ro"]
        args += ["--build-arg", "PIP_CERT=/run/host-ca.crt"]
    dockerfile = ["-f", "ops/Dockerfile", "--ignorefile", "ops/Dockerfile.dockerignore"]
    command = ["podman", *podman_flags(), "build", *dockerfile, "-t", IMAGE, "--network", "host", *ulimits()]
    command += [*volumes, *args]
    # Without --layers, no intermediate image outlives the build (the build stage with its compiler and torch: ~7 GB).
    command += ["--layers=true"] if layers else ["--layers=false"]
    start = time.perf_counter()
    with contextlib.chdir(ROOT):
        run([*command, "."], timeout=3600, log=log)
    return time.perf_counter() - start


def in_image(command: list[str], *, env: dict[str, str] | None = None, check: bool = True, log=None, entrypoint=None):
    flags = ["--rm", "--network", "host", *ulimits()]
    for name, value in (env or {}).items():
        flags += ["-e", f"{name}={value}"]
    if entrypoint is not None:
        flags += ["--entrypoint", entrypoint]
    return run(["podman", *podman_flags(), "run", *flags, IMAGE, *command], timeout=600, check=check, log=log)


@contextlib.contextmanager
def scratch_database():
    """A database of its own on the test Postgres, dropped afterwards: `item db upgrade` never touches `test`."""
    import sqlalchemy as sa

    url = sa.make_url(POSTGRES)
    name = f"item_image_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def checks_in_image(log) -> dict:
    found: dict = {}
    probe = (
        "import importlib.metadata as m, importlib.util as u, os, sys; "
        "print(os.getuid(), open('/proc/1/comm').read().strip(), m.version('torch'), "
        f"m.version('torchvision'), ','.join(n for n in {LAB!r} if u.find_spec(n)) or '-', sys.version.split()[0])"
    )
    uid, *rest = in_image(["python", "-c", probe], log=log).stdout.split()
    found["uid"] = int(uid)
    found["pid1"], found["torch"], found["torchvision"], lab, found["python"] = rest
    found["lab_packages_present"] = [] if lab == "-" else lab.split(",")
    found["item_help_s"] = _timed(lambda: in_image(["item", "--help"], log=log))
    if found["uid"] == 0:
        raise StepFailed("the image runs as root")
    if found["pid1"] != "tini":
        raise StepFailed(f"PID 1 is not tini: {found['pid1']}")
    if found["lab_packages_present"]:
        raise StepFailed(f"the lab's packages are in the image: {found['lab_packages_present']}")
    return found


def health(log) -> dict:
    with scratch_database() as database:
        env = {"ITEM_DATABASE_URL": database, "ITEM_BROKER_URL": REDIS, "ITEM_LOG_FORMAT": "json"}
        upgrade_s = _timed(lambda: in_image(["item", "db", "upgrade"], env=env, log=log))
        start = time.perf_counter()
        done = in_image(["item", "health", "--json"], env=env, check=False, log=log)
        health_s = round(time.perf_counter() - start, 2)
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as error:
        raise StepFailed(
            f"`item health --json` printed no JSON (exit {done.returncode}): {done.stderr[-2000:]}"
        ) from error
    failing = [name for name in ("database", "migrations", "broker") if not report["checks"][name]["ok"]]
    if failing:
        raise StepFailed(f"health checks failed in the image: {failing}: {report}")
    if done.returncode != (0 if report["ok"] else 1):
        raise StepFailed(f"`item health` exited {done.returncode} for ok={report['ok']}")
    return {"db_upgrade_s": upgrade_s, "health_s": health_s, "exit": done.returncode, "report": report}


def stop_by_sigterm(log) -> dict:
    """A process that exits on SIGTERM: `podman stop` (SIGTERM, then SIGKILL after 30 s) must end it at once."""
    name = f"item-stop-{uuid.uuid4().hex[:8]}"
    waiter = (
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), sys.exit(0))); "
        "print('ready', flush=True); time.sleep(120)"
    )
    run(["podman", *podman_flags(), "run", "-d", "--name", name, *ulimits(), IMAGE, "python", "-c", waiter],
        timeout=120, log=log)  # fmt: skip
    try:
        for _ in range(100):
            if "ready" in run(["podman", "logs", name], timeout=30, quiet=True).stdout:
                break
            time.sleep(0.1)
        stop_s = _timed(lambda: run(["podman", *podman_flags(), "stop", "-t", "30", name], timeout=120, log=log))
        logs = run(["podman", "logs", name], timeout=30, quiet=True).stdout
        code = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name], timeout=30, quiet=True).stdout
    finally:
        run(["podman", "rm", "-f", name], timeout=120, check=False, quiet=True)
    if "got SIGTERM" not in logs or stop_s > 10:
        raise StepFailed(f"SIGTERM did not reach the command through tini ({stop_s:.1f} s): {logs!r}")
    return {"stop_s": stop_s, "exit": int(code.strip())}


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return round(time.perf_counter() - start, 2)


def cleanup(keep: bool, log) -> None:
    if not keep:
        run(["podman", "rmi", "-f", IMAGE], timeout=600, check=False, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep {IMAGE} (the base is always kept)")
    parser.add_argument("--rebuild-base", action="store_true", help=f"make {BASE} again with debootstrap")
    parser.add_argument("--layers", action="store_true", help="keep the build's layers, for a faster next build")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--log", type=Path, default=Path("/var/tmp/item-build-image.log"), help="commands' output")
    options = parser.parse_args(argv)
    for tool in ("podman",):
        if not shutil.which(tool):
            print(f"cannot build here: {tool} is not installed (apt-get install -y buildah podman)", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print("cannot build here: run as root (this check uses rootful podman)", file=sys.stderr)
        return 1
    result: dict = {"builder": run(["podman", "--version"], timeout=60, quiet=True).stdout.strip()}
    status = 0
    with options.log.open("w") as log:
        try:
            if options.rebuild_base or not image_exists(BASE):
                result["base_s"] = round(make_base(log), 1)
            result["build_s"] = round(build(log, layers=options.layers), 1)
            size = run(["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE], timeout=60, quiet=True)
            result["image_bytes"] = int(size.stdout.strip())
            base_size = run(["podman", "image", "inspect", "--format", "{{.Size}}", BASE], timeout=60, quiet=True)
            result["base_bytes"] = int(base_size.stdout.strip())
            result["image"] = checks_in_image(log)
            result["health"] = health(log)
            result["sigterm"] = stop_by_sigterm(log)
        except (StepFailed, subprocess.TimeoutExpired) as error:
            result["error"] = str(error)
            status = 1
        finally:
            cleanup(options.keep, log)
    if options.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value, indent=2) if isinstance(value, dict) else value}")
        if "image_bytes" in result:
            print(f"image size: {result['image_bytes'] / 1e9:.2f} GB (base {result['base_bytes'] / 1e9:.2f} GB)")
    print(f"commands' output: {options.log}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
