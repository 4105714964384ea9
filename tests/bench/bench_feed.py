"""Does the service keep a GPU busy, and what does each image cost in CPU outside the device?

A benchmark instrument, run on demand (never in the suite's timed assertions). It sends 1024×768 JPEGs from a
platform's plain Celery client through the whole stack (Redis → `item worker` intake → Postgres ledger → GPU loop
→ store and deliveries) to `done`, with the `sim` profile's simulated device standing in for the GPU: the host
work of the paper profile runs for real, and each model call holds the loop's device for the paper models' H100
time, scaled here to a chosen rate (`--rate`, images a second per loop at 4 objects an image). Two sources:
inline (base64 in the message) and by URL from a local server that waits 50 ms before answering.

    python -m tests.bench.bench_feed --json                        # 60 img/s, inline and url, 1200 images each
    python -m tests.bench.bench_feed --rates 60,90,120 --sources inline   # the highest rate held at ≥ 0.95 busy
    python -m tests.bench.bench_feed --ceiling --json              # zero-time device, 64×64 images: checks/s
    python -m tests.bench.bench_feed --before-after --json         # ITEM_PREPARE_AHEAD off, then on, same run
    python -m tests.bench.bench_feed --mode embedded --profile paper-random --device cuda --n 256 --json

Figures per phase:
- `img_s`: checks done a second, from the first send to the last check done (every check must end `done`);
  `steady_img_s`: the same between the 10th and the 90th percentile of the checks' finishing times (no start-up,
  no drain), and `steady_busy`, that rate over the simulated one.
- `busy`: the device's busy share over the phase, from the GPU loop's batch lines (`busy_ms`: the simulated
  device's time held; on a real device the model thread's time in the models).
- `cpu_ms_per_image`: CPU milliseconds per image of each part, from /proc: the worker's main process (`intake`:
  the Celery consumer, filing, deliveries), the GPU process by OS thread (`gpu.models` is its main thread, the
  model thread; `gpu.prefetch` claims, reads, decodes and prepares; `gpu.store`; the rest), `postgres`, `redis`,
  `client` (this process: the Celery client, the image server and the polling), and `all` (their sum, without
  the machine's other load).

`--mode embedded` (for a machine without Redis or Postgres, such as the lent GPU): a SQLite ledger, checks filed
straight into it, and the worker's real GPU loop (prefetch, models, store threads) run in this process on
`--profile`/`--device`; figures are `img_s`, `busy` and this process's CPU per image.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import io
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.simulated import DEVICE_MS, SimulatedDevice

OBJECTS = 4  # the sim profile's made-up captions have four objects each
URL_DELAY_S = 0.05
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- inputs


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG (smooth colour fields with grain, quality 90): decodes like an upload, never all zeros."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((12, 16, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image).astype(np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def device_ms_for(rate: float) -> dict[str, float]:
    """The simulated times scaled so that an image of OBJECTS objects holds the device 1/rate seconds (0: none)."""
    if rate <= 0:
        return dict.fromkeys(DEVICE_MS, 0.0)
    factor = (1000 / rate) / SimulatedDevice().per_image_ms(OBJECTS)
    return {part: ms * factor for part, ms in DEVICE_MS.items()}


# ---------------------------------------------------------------- CPU by part, from /proc


def _stat(path: Path) -> tuple[str, int, float] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = path.read_text()
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS
    return None


def cpu_seconds(worker_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of each part (see the module's docstring)."""
    used: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        found = _stat(stat)
        if found is None:
            continue
        name, parent, seconds = found
        pid = int(stat.parent.name)
        if worker_pid is not None and pid == worker_pid:
            part = "intake"
        elif worker_pid is not None and parent == worker_pid:
            for task in (stat.parent / "task").glob("[0-9]*/stat"):
                thread = _stat(task)
                if thread is not None:
                    key = "gpu.models" if int(task.parent.name) == pid else "gpu." + thread[0].removeprefix("item-")
                    used[key] = used.get(key, 0.0) + thread[2]
            continue
        elif name.startswith("postgres"):
            part = "postgres"
        elif name.startswith("redis"):
            part = "redis"
        elif pid == os.getpid():
            part = "client"
        else:
            continue
        used[part] = used.get(part, 0.0) + seconds
    return used


def per_image(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    parts = {part: 1000 * (after.get(part, 0.0) - before.get(part, 0.0)) / n for part in set(before) | set(after)}
    parts = {part: round(ms, 2) for part, ms in sorted(parts.items()) if ms > 0.005}
    parts["all"] = round(sum(parts.values()), 2)
    return parts


# ---------------------------------------------------------------- the whole stack


def finishing_times(engine, prefix: str, n: int, timeout_s: float) -> list[float]:
    """Waits until the `n` checks of `prefix` ended; returns their finishing times (epoch seconds)."""
    import sqlalchemy as sa

    query = sa.text(
        "SELECT count(*) FILTER (WHERE status IN ('done', 'rejected', 'failed')), count(*) FILTER (WHERE status = "
        "'done') FROM checks WHERE external_id LIKE :prefix"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as connection:
            terminal, done = connection.execute(query, {"prefix": prefix + "%"}).one()
        if terminal >= n:
            if done != n:
                raise SystemExit(f"{prefix}: {n - done} of {n} checks ended other than done")
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{prefix}: {terminal} of {n} checks ended after {timeout_s:.0f}s")
        time.sleep(0.2)
    finished = sa.text("SELECT extract(epoch FROM finished_at) FROM checks WHERE external_id LIKE :prefix")
    with engine.connect() as connection:
        return sorted(float(row[0]) for row in connection.execute(finished, {"prefix": prefix + "%"}))


def through_stack(
    stack, engine, worker, source: str, payloads: list[bytes], url_base: str, served: dict, rate: float = 0.0
) -> dict:
    """One phase: every payload sent by the platform's client, inline or as a URL the local server answers (from
    `served`) after URL_DELAY_S; timed until the last check is done."""
    from tests.bench.bench_stack import batch_lines
    from tests.integration.stack import platform_client

    n, since = len(payloads), worker.log.stat().st_size
    client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    prefix = f"feed-{source}-{time.time_ns()}-"
    if source == "url":
        served.update({f"{prefix}{i}.jpg": payload for i, payload in enumerate(payloads)})
    images = [
        {"url": f"{url_base}/{prefix}{i}.jpg"} if source == "url" else {"b64": base64.b64encode(p).decode()}
        for i, p in enumerate(payloads)
    ]
    cpu_before, started = cpu_seconds(worker.process.pid), time.time()
    for i, image in enumerate(images):
        client.send_task("item.check", kwargs={"external_id": f"{prefix}{i}", "image": image}, queue="item.checks")
    finished = finishing_times(engine, prefix, n, timeout_s=120 + n)
    elapsed = finished[-1] - started
    cpu = per_image(cpu_before, cpu_seconds(worker.process.pid), n)
    time.sleep(0.5)  # the last batch's line follows its commit
    with worker.log.open("rb") as file:
        file.seek(since)
        lines = batch_lines(file.read().decode(errors="replace"))
    low, high = finished[n // 10], finished[(9 * n) // 10]
    return {
        "img_s": n / elapsed,
        "steady_img_s": (0.8 * n) / (high - low) if high > low else None,
        "busy": sum(line.get("busy_ms", 0.0) for line in lines) / 1000 / elapsed,
        # Every image holds the simulated device equally long: the busy share between the 10th and 90th percentile
        "steady_busy": (0.8 * n) / (high - low) / rate if high > low and rate > 0 else None,
        "batches": len(lines),
        "checks_per_batch": sum(line.get("checks", 0) for line in lines) / max(1, len(lines)),
        "ms_per_check": {
            key: sum(line.get(key, 0.0) for line in lines) / max(1.0, sum(line.get("checks", 0) for line in lines))
            for key in ("read_ms", "prepare_ms", "model_ms", "ledger_ms")
        },
        "cpu_ms_per_image": cpu,
    }


def stack_run(args, scratch: Path, rate: float, prepare_ahead: bool, images: dict[str, bytes], sources) -> dict:
    """One worker at `rate`, every source in turn, after a warm-up batch."""
    import sqlalchemy as sa

    from pipeline.core.model_store import ModelStore
    from tests.bench.bench_stack import BenchWorker
    from tests.integration.conftest import temporary_postgres_database
    from tests.integration.stack import make_stack, serve_images

    store = ModelStore(args.model_dir or scratch / "models", allow_download=False)
    size = (64, 64) if args.ceiling else (1024, 768)
    results = {}
    with temporary_postgres_database() as url, contextlib.ExitStack() as exits:
        url_base = exits.enter_context(serve_images(images, URL_DELAY_S))
        stack = exits.enter_context(
            contextlib.contextmanager(make_stack)(
                url, store, scratch,
                ITEM_PROFILE=args.profile, ITEM_HEAD="untrained", ITEM_DEVICE="cpu",
                ITEM_SIMULATED_DEVICE_MS=json.dumps(device_ms_for(rate)),
                ITEM_PREPARE_AHEAD=str(prepare_ahead).lower(),
                ITEM_BATCH_SIZE=str(args.batch_size), ITEM_BATCH_MAX_WAIT_S="0.05",
                ITEM_BATCH_TIME_BUDGET_S="600", ITEM_LEASE_S="60", ITEM_RECONCILE_AFTER_S="1200",
                ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]), ITEM_THUMBNAIL_MAX_SIDE="256",
            )
        )  # fmt: skip
        engine = sa.create_engine(url)
        exits.callback(engine.dispose)
        worker = BenchWorker(stack, f"feed-worker-{int(prepare_ahead)}-{int(rate)}", concurrency=1)
        exits.callback(worker.close)
        if args.log:
            exits.callback(lambda: _keep_log(worker.log, args.log))
        warm = [jpeg(10_000_000 + i, size) for i in range(args.batch_size)]
        through_stack(stack, engine, worker, "inline", warm, url_base, images)
        for number, source in enumerate(sources):
            payloads = [jpeg(1_000_000 * (number + 1) + i, size) for i in range(args.n)]
            results[source] = through_stack(stack, engine, worker, source, payloads, url_base, images, rate)
            images.clear()
    return results


def _keep_log(log: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / log.name).write_bytes(log.read_bytes())


# ---------------------------------------------------------------- embedded (no services)


def embedded_run(args, scratch: Path) -> dict:
    """The worker's real GPU loop in this process on a SQLite ledger: checks filed straight into it."""
    from worker.gpu.build import build_service
    from worker.gpu.loop import Loop
    from worker.intake.filing import CheckRequest, Intake
    from worker.ledger import migrate
    from worker.settings import load_settings

    database = f"sqlite:///{scratch / 'ledger.db'}"
    migrate.upgrade(database)
    settings = load_settings(
        database_url=database, profile=args.profile, device=args.device, head="untrained",
        model_dir=args.model_dir or scratch / "models", allow_download=False, batch_size=args.batch_size,
        batch_max_wait_s=0.05, batch_time_budget_s=600, lease_s=60, simulated_device_ms=device_ms_for(args.rates[0]),
        max_b64_bytes=16 * 1024 * 1024,
    )  # fmt: skip
    service = build_service(settings)
    service.detector.load()
    service.register_version(activate=True)
    intake = Intake(settings, service.ledger)
    size = (1024, 768)
    warm = [jpeg(10_000_000 + i, size) for i in range(args.batch_size)]
    payloads = [jpeg(1_000_000 + i, size) for i in range(args.n)]
    results = {}
    for phase, batch in (("warm_up", warm), ("inline", payloads)):
        requests = [CheckRequest(f"{phase}-{i}", {"b64": base64.b64encode(p).decode()}) for i, p in enumerate(batch)]
        filed = intake.file(requests, version_id=service.version_id)
        ids = {one.check.id for one in filed}
        stop = threading.Event()
        loop = Loop(service, stop=stop)
        cpu_before, started = time.process_time(), time.perf_counter()
        busy_before = _busy_total(service)
        thread = threading.Thread(target=loop.run_forever, name="item-models", daemon=True)
        thread.start()
        _wait_ended(service, ids, timeout_s=600)
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join(60)
        results[phase] = {
            "img_s": len(batch) / elapsed,
            "busy": (_busy_total(service) - busy_before) / elapsed,
            "cpu_ms_per_image": {"process": round(1000 * (time.process_time() - cpu_before) / len(batch), 2)},
        }
    results.pop("warm_up")
    return results


def _busy_total(service) -> float:
    from worker.ops import metrics

    return metrics.DEVICE_BUSY.labels(str(service.detector.device))._value.get()


def _wait_ended(service, ids: set[str], timeout_s: float) -> None:
    from worker.ledger.states import TERMINAL_STATUSES

    deadline, pending = time.monotonic() + timeout_s, set(ids)
    while pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} checks still not ended after {timeout_s:.0f}s")
        time.sleep(0.2)
        with service.ledger.session() as session:
            rows = service.ledger.checks_by_id(session, sorted(pending))
        pending.difference_update(row.id for row in rows if row.status in TERMINAL_STATUSES)


# ---------------------------------------------------------------- main


def run(args, scratch: Path) -> dict:
    if args.mode == "embedded":
        return {"embedded": embedded_run(args, scratch)}
    images: dict[str, bytes] = {}
    runs = {}
    settings = [(False, "before"), (True, "after")] if args.before_after else [(True, None)]
    for rate in args.rates:
        for prepare_ahead, label in settings:
            key = f"rate_{rate:g}" + (f"_{label}" if label else "")
            folder = scratch / key
            folder.mkdir()
            runs[key] = {
                "rate": rate,
                "prepare_ahead": prepare_ahead,
                **stack_run(args, folder, rate, prepare_ahead, images, args.sources),
            }
    return runs


def machine() -> dict:
    """The machine as bench_stack describes it, and its load average when the run began."""
    from tests.bench import bench_stack

    return {**bench_stack.machine(), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="60", help="Simulated img/s per loop, comma-separated (0: no device).")
    parser.add_argument("--n", type=int, default=1200, help="Images per source and rate.")
    parser.add_argument("--sources", default="inline,url", help="inline, url or both.")
    parser.add_argument("--batch-size", type=int, default=32, help="ITEM_BATCH_SIZE (default 32).")
    parser.add_argument("--ceiling", action="store_true", help="Zero-time device and 64×64 images: the service's rate.")
    parser.add_argument("--before-after", action="store_true", help="Each rate with ITEM_PREPARE_AHEAD off, then on.")
    parser.add_argument("--mode", choices=("stack", "embedded"), default="stack")
    parser.add_argument("--profile", default="sim", help="sim (default); embedded mode may name a real profile.")
    parser.add_argument("--device", default="cpu", help="Embedded mode's device (cuda on a GPU).")
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--log", type=Path, help="Copy the workers' logs into this folder.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    args.rates = [0.0] if args.ceiling else [float(rate) for rate in args.rates.split(",")]
    args.sources = [source.strip() for source in args.sources.split(",") if source.strip()]
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.bench.bench_feed", *sys.argv[1:]]),
        "n": args.n,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as scratch:
        from tests.bench.bench_stack import rounded

        result = rounded({**header, **run(args, Path(scratch)), "load_after": os.getloadavg()[0]})
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
