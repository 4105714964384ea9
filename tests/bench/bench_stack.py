"""The whole stack against the pipeline alone: N distinct images through one `item worker --concurrency 1` (Redis →
intake → Postgres ledger → GPU loop → ledger), sent three ways, and through the detector in-process.

Needs the test services (Redis and PostgreSQL; see README, Tests). Run on demand, on an otherwise idle machine:
    python -m tests.bench.bench_stack --json                      # tiny, n=200, batch 16, all phases
    python -m tests.bench.bench_stack --profile small-random --n 8 --batch-size 4 --model-dir /tmp/item-models

Phases, one after another, each with its own fresh external ids and its own images (distinct seeds, so the ledger's
duplicate-bytes shortcut never answers from an earlier phase); one worker, started (and sent one warm-up batch)
before the first timed phase:
  in_process     decode + models in this process (Detector, random head), `detect` per batch, bytes read beforehand.
  celery_client  a platform's plain Celery client (`platform_client`) sends `item.check` with inline base64 images;
                 clock from the first send to the last check terminal in the ledger.
  item_submit    `item submit --json <paths>`; clock from the command's start to the last check terminal.
  url            `{"url": ...}` sources sent by the Celery client, served by a local threaded HTTP server that waits
                 100 ms before answering each image (worker allowed to fetch from 127.0.0.1).
Terminal checks are counted with one aggregate SQL query every 0.1 s; every check must end `done`.

Figures per phase: `per_s` images per second; `ratio` that rate over in_process's; from the worker's log lines
`batch stored checks=.. statements=.. ledger_ms=.. read_ms=.. model_ms=..` (null where the worker logs none):
`ledger_ms_per_check`, `read_ms_per_check`, `model_ms_per_check` (sum of the ms over sum of the checks) and
`statements_per_batch` (mean); `gpu_projection`, the images per second one worker process could feed a GPU,
1000 / (ledger_ms_per_check + read_ms_per_check). It assumes that storing and reading (the work of the worker's
other threads, which must keep up with the GPU) cost per check what they cost here and scale linearly; that the
GPU itself is never the limit; that those threads get a core of their own (here they share 2 cores with CPU
models); and that intake and Postgres keep up. In `url`, read_ms includes the server's 100 ms waits.

`cpu_ms_per_check`: CPU milliseconds per check of each part of the stack over the phase (the GPU loop process, the
rest of the worker, Postgres, Redis, this process as the client, and the whole machine), from /proc; in_process:
this process and the machine. On a CPU-only machine the models and the service share the cores, so the service's
CPU per check bounds the ratio: with the models needing M ms of CPU per image and the service S, at best M/(M+S).

Goals (the issue): on this machine, tiny profile, batch 16, each ratio ≥ 0.9, and ledger_ms_per_check ≤ 2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from pipeline.core.detector import Detector, untrained_head
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests.conftest import random_head
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, platform_client, serve_images

PHASES = ("in_process", "celery_client", "item_submit", "url")
TERMINAL_SQL = sa.text(
    "SELECT count(*) FILTER (WHERE status IN ('done', 'rejected', 'failed')), count(*) FILTER (WHERE status = 'done')"
    " FROM checks WHERE external_id LIKE :prefix"
)
URL_DELAY_S = 0.1
CPU_PARTS = ("gpu_loop", "worker_main", "postgres", "redis", "client", "machine")


class BenchWorker(Worker):
    """A Worker that is killed if it never gets ready, and given longer to load a larger profile's models."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if hasattr(self, "process"):
                self.kill()
            raise

    def wait_for(self, pattern: str, timeout: float) -> None:
        super().wait_for(pattern, max(timeout, 900))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()  # if SIGTERM did not end it in 30 s


def head_for(detector: Detector):
    return random_head(detector) if detector.profile.name == "tiny" else untrained_head(detector)


def in_process(profile: str, store: ModelStore, payloads: list[bytes], warm_up: list[bytes], batch: int) -> float:
    detector = Detector(get_profile(profile), store, device="cpu")
    detector.use_head(head_for(detector))
    detector.load()
    detector.detect([decode_image(p) for p in warm_up])
    started, cpu_before = time.perf_counter(), cpu_seconds(None)
    for start in range(0, len(payloads), batch):
        detector.detect([decode_image(p) for p in payloads[start : start + batch]])
    elapsed, cpu = time.perf_counter() - started, cpu_ms_per_check(cpu_before, cpu_seconds(None), len(payloads))
    return {"per_s": len(payloads) / elapsed, "cpu_ms_per_check": {"client": cpu["client"], "machine": cpu["machine"]}}


def wait_terminal(engine: sa.Engine, prefix: str, n: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            terminal, done = connection.execute(TERMINAL_SQL, {"prefix": prefix + "%"}).one()
        if terminal >= n:
            assert done == n, f"{prefix}: {n - done} of {n} checks ended other than done"
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{prefix}: {terminal} of {n} checks terminal after {timeout}s")
        time.sleep(0.1)


def batch_lines(text: str) -> list[dict[str, float]]:
    """The `batch stored checks=.. statements=.. ledger_ms=.. read_ms=.. model_ms=..` lines' numbers."""
    lines = re.findall(r"batch stored ([^\n]*)", text)
    return [{key: float(value) for key, value in re.findall(r"(\w+)=(\d+(?:\.\d+)?)", line)} for line in lines]


def log_figures(log: Path, since: int, n: int) -> dict:
    deadline = time.monotonic() + 2  # the last batch's line may follow its rows by a moment
    while True:
        with log.open("rb") as file:
            file.seek(since)
            lines = batch_lines(file.read().decode(errors="replace"))
        if not lines or sum(line.get("checks", 0) for line in lines) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    keys = ("checks", "statements", "ledger_ms", "read_ms", "model_ms")
    if not lines or any(key not in line for line in lines for key in keys):
        return dict.fromkeys(("ledger_ms_per_check", "read_ms_per_check", "model_ms_per_check", "statements_per_batch"))
    checks = sum(line["checks"] for line in lines) or 1
    figures = {f"{key}_per_check": sum(line[key] for line in lines) / checks for key in keys[2:]}
    return {**figures, "statements_per_batch": sum(line["statements"] for line in lines) / len(lines)}


def cpu_seconds(worker_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by each part of the stack, from /proc: the worker's GPU loop, the rest of the worker
    (intake, deliverer, GPU step), Postgres, Redis, this process (the client and the polling), and the machine."""
    ticks, used = os.sysconf("SC_CLK_TCK"), dict.fromkeys(CPU_PARTS, 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            pid, parent, seconds = int(stat.parent.name), int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks
            part = _part(pid, parent, name, worker_pid)
            if part:
                used[part] += seconds
    busy = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    used["machine"] = (sum(map(int, busy)) - int(busy[3]) - int(busy[4])) / ticks  # all but idle and iowait
    return used


def _part(pid: int, parent: int, name: str, worker_pid: int | None) -> str | None:
    if pid == worker_pid:
        return "worker_main"
    if parent == worker_pid:
        return "gpu_loop" if name.startswith("python") else "worker_main"
    if name.startswith("postgres"):
        return "postgres"
    if name.startswith("redis"):
        return "redis"
    return "client" if pid == os.getpid() else None


def cpu_ms_per_check(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {part: 1000 * (after[part] - before[part]) / n for part in before}


def through_stack(phase: str, stack, engine, worker: Worker, payloads: list[bytes], url_base: str | None) -> dict:
    n, since = len(payloads), worker.log.stat().st_size
    cpu_before = cpu_seconds(worker.process.pid)
    prefix = f"bench-{phase}-{time.time_ns()}-"
    if phase == "item_submit":
        folder = stack.folder / prefix.rstrip("-")
        folder.mkdir()
        paths = [folder / f"{i}.png" for i in range(n)]
        for path, payload in zip(paths, payloads, strict=True):
            path.write_bytes(payload)
        prefix = f"{folder}/"  # `item submit`'s external ids are its inputs
        started = time.perf_counter()
        stack.submit(*map(str, paths))
    else:
        client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
        images = [
            {"url": f"{url_base}/{i}.png"} if phase == "url" else {"b64": base64.b64encode(p).decode()}
            for i, p in enumerate(payloads)
        ]
        started = time.perf_counter()
        for i, image in enumerate(images):
            client.send_task("item.check", kwargs={"external_id": f"{prefix}{i}", "image": image}, queue="item.checks")
    wait_terminal(engine, prefix, n)
    elapsed = time.perf_counter() - started
    cpu = cpu_ms_per_check(cpu_before, cpu_seconds(worker.process.pid), n)
    return {"per_s": n / elapsed, **log_figures(worker.log, since, n), "cpu_ms_per_check": cpu}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {"cpus": os.cpu_count(), "processor": platform.processor() or (model.group(1) if model else None)}


def run(args: argparse.Namespace, scratch: Path) -> dict:
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; known: {', '.join(PHASES)}")
    store = ModelStore(args.model_dir or scratch / "models", allow_download=False)
    for spec in {**get_profile("tiny").specs, **get_profile(args.profile).specs}.values():
        store.locate(spec)  # generates the random models (once, with --model-dir)
    results: dict = {}
    with temporary_postgres_database() as url, contextlib.ExitStack() as exits:
        overrides = {"ITEM_PROFILE": args.profile}
        if args.profile != "tiny":
            detector = Detector(get_profile(args.profile), store, device="cpu")
            overrides["ITEM_HEAD"] = str(head_for(detector).save(scratch / "head-profile.safetensors"))
        images: dict[str, bytes] = {}
        url_base = exits.enter_context(serve_images(images, URL_DELAY_S))
        stack = exits.enter_context(
            contextlib.contextmanager(make_stack)(
                url,
                store,
                scratch,
                ITEM_BATCH_SIZE=str(args.batch_size),
                ITEM_BATCH_TIME_BUDGET_S="600",
                ITEM_LEASE_S="60",
                ITEM_RECONCILE_AFTER_S="1200",
                ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
                **overrides,
            )
        )

        def payloads(phase_index: int, count: int) -> list[bytes]:
            paths = [stack.image(1_000_000 * (phase_index + 1) + i) for i in range(count)]
            return [path.read_bytes() for path in paths]

        data = {phase: payloads(PHASES.index(phase), args.n) for phase in PHASES}
        warm_up = payloads(len(PHASES), args.batch_size)
        images.update({f"{i}.png": p for i, p in enumerate(data["url"])})
        if "in_process" in phases:
            results["in_process"] = in_process(args.profile, store, data["celery_client"], warm_up, args.batch_size)
        engine = sa.create_engine(url)
        exits.callback(engine.dispose)
        if args.log:  # kept even when the worker fails to start
            log = scratch / "bench-worker.log"
            exits.callback(lambda: (args.log.mkdir(parents=True, exist_ok=True), shutil.copy(log, args.log)))
        worker = BenchWorker(stack, "bench-worker", concurrency=1)
        exits.callback(worker.close)
        results["worker_started_in_s"] = worker.started_in
        through_stack("warm_up", stack, engine, worker, warm_up, url_base)
        for phase in (p for p in PHASES if p in phases and p != "in_process"):
            results[phase] = through_stack(phase, stack, engine, worker, data[phase], url_base)
    direct = results.get("in_process", {}).get("per_s")
    for phase in PHASES[1:]:
        if phase in results:
            figures = results[phase]
            figures["ratio"] = figures["per_s"] / direct if direct else None
            ledger_ms, read_ms = figures["ledger_ms_per_check"], figures["read_ms_per_check"]
            service_ms = None if ledger_ms is None else ledger_ms + read_ms
            figures["gpu_projection"] = 1000 / service_ms if service_ms else None
    return results


def rounded(value):
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny", help="tiny (default) or small-random (slow on CPU).")
    parser.add_argument("--n", type=int, help="Images per phase (default 200; 32 for other profiles).")
    parser.add_argument("--batch-size", type=int, help="ITEM_BATCH_SIZE and the in-process batch (16; 4 otherwise).")
    parser.add_argument("--phases", default=",".join(PHASES), help="Comma list of " + ", ".join(PHASES) + ".")
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--log", type=Path, help="Copy the worker's log into this folder.")
    args = parser.parse_args()
    tiny = args.profile == "tiny"
    args.n = args.n or (200 if tiny else 32)
    args.batch_size = args.batch_size or (16 if tiny else 4)
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.bench.bench_stack", *sys.argv[1:]]),
        "profile": args.profile,
        "n": args.n,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as scratch:
        result = rounded({**header, **run(args, Path(scratch))})
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['date']}  {result['machine']['cpus']} CPUs, {result['machine']['processor']}")
    print(f"{result['command']}  ({args.profile}, n={args.n}, batch {args.batch_size}, one worker, CPU)")
    columns = ("per_s", "ratio", "ledger_ms_per_check", "read_ms_per_check", "model_ms_per_check")
    columns += ("statements_per_batch", "gpu_projection")
    short = {"statements_per_batch": "stmts/batch", "gpu_projection": "gpu_proj/s"}
    print(f"{'phase':14}" + "".join(f"{short.get(c, c.replace('_per_check', '/chk')):>14}" for c in columns))
    for phase in PHASES:
        if phase in result:
            cells = ("-" if result[phase].get(c) is None else result[phase][c] for c in columns)
            print(f"{phase:14}" + "".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main()
