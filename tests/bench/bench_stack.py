"""Full stack vs in-process: the same N images through `item submit` → Postgres → `item worker`, and through
the pipeline directly, tiny profile, same batch size. Prints both throughputs and their ratio.

Needs the test services (Redis and PostgreSQL; see README, Tests). Run on demand:
    python -m tests.bench.bench_stack --n 200 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.core.detector import Detector
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests.conftest import random_head
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, tiny_models


def in_process(store: ModelStore, paths: list[Path], batch_size: int) -> float:
    detector = Detector(get_profile("tiny"), store, device="cpu")
    detector.use_head(random_head(detector))
    detector.load()
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        detector.detect([decode_image(p.read_bytes()) for p in paths[start : start + batch_size]])
    return len(paths) / (time.perf_counter() - started)


def through_the_stack(stack, paths: list[Path], keep_log: Path | None) -> float:
    worker = Worker(stack, "bench-worker")
    try:
        started = time.perf_counter()
        submitted = stack.submit(*map(str, paths))
        rows = stack.wait_terminal([s["check_id"] for s in submitted], timeout=3600)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
        if keep_log:
            shutil.copy(worker.log, keep_log)
    assert {row.status for row in rows.values()} == {"done"}
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--log", type=Path, help="Keep the worker's log here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, temporary_postgres_database() as url:
        folder = Path(scratch)
        store = tiny_models(folder / "models")
        with contextlib.contextmanager(make_stack)(
            url,
            store,
            folder,
            ITEM_BATCH_SIZE=str(args.batch_size),
            ITEM_BATCH_TIME_BUDGET_S="300",
            ITEM_RECONCILE_AFTER_S="600",
        ) as stack:
            paths = [stack.image(seed) for seed in range(args.n)]
            direct = in_process(store, paths, args.batch_size)
            full = through_the_stack(stack, paths, args.log)
    result = {
        "n": args.n,
        "batch_size": args.batch_size,
        "in_process_per_s": round(direct, 2),
        "full_stack_per_s": round(full, 2),
        "ratio": round(full / direct, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"in-process : {direct:8.2f} images/s")
        print(f"full stack : {full:8.2f} images/s  (item submit → Postgres → item worker)")
        print(f"ratio      : {full / direct:8.3f}  (n={args.n}, batch {args.batch_size}, tiny profile, CPU)")


if __name__ == "__main__":
    main()
