"""Wall time of the client commands, as a platform's script runs them: whole `item` processes.

    python -m tests.bench.bench_client [--item LABEL=PATH ...] [--runs 7] [--broker-url redis://127.0.0.1:6379/0]

Each `--item` is an `item` executable (another checkout's venv, to compare versions); the runs of all of them
alternate, so a noisy machine weighs on each alike. The ledger is a fresh, migrated SQLite file with one
registered pipeline version; `submit` sends one small PNG to the broker under a key prefix of its own, deleted
afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from pipeline.core.results import PipelineVersion
from tests.conftest import encode, noise_image
from worker.ledger import migrate
from worker.ledger.store import Ledger

COMMANDS = {"status": ["status"], "submit one file": ["submit", "{image}"], "--help": ["--help"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--item", action="append", help="LABEL=PATH of an item executable (default: this one)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--broker-url", default=os.environ.get("ITEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    executables = dict(item.split("=", 1) for item in args.item or [f"this={Path(sys.executable).parent / 'item'}"])
    with tempfile.TemporaryDirectory() as folder:
        env = _environment(Path(folder), args.broker_url)
        try:
            for name, command in COMMANDS.items():
                times = _timed(executables, command, env, args.runs)
                cells = [f"{who}: median {statistics.median(t):.2f} s (min {min(t):.2f})" for who, t in times.items()]
                print(f"{name:16s} " + " | ".join(cells), flush=True)
        finally:
            client = redis.Redis.from_url(args.broker_url)
            for key in client.scan_iter(f"{env['ITEM_REDIS_KEY_PREFIX']}*"):
                client.delete(key)


def _environment(folder: Path, broker_url: str) -> dict[str, str]:
    url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    ledger = Ledger(url)
    with ledger.session() as session:  # as a first worker would
        ledger.ensure_pipeline_version(session, PipelineVersion("caption:c", "ground:g", "embed:e", "h"), "tiny")
    ledger.dispose()
    (folder / "one.png").write_bytes(encode(noise_image(1, 64, 64)))
    prefix = f"item-bench-{uuid.uuid4().hex[:8]}:"
    return {
        **os.environ,
        "ITEM_DATABASE_URL": url,
        "ITEM_BROKER_URL": broker_url,
        "ITEM_REDIS_KEY_PREFIX": prefix,
        "BENCH_IMAGE": str(folder / "one.png"),
    }


def _timed(executables: dict[str, str], command: list[str], env: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in executables}
    for run in range(runs):
        for label, executable in executables.items():
            argv = [part.format(image=env["BENCH_IMAGE"]) for part in command]
            if argv[0] == "submit":
                argv += ["-e", f"bench-{label}-{run}"]
            started = time.perf_counter()
            result = subprocess.run([executable, *argv], env=env, capture_output=True, text=True)
            times[label].append(time.perf_counter() - started)
            if result.returncode != 0:
                raise SystemExit(f"{label} {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    return times


if __name__ == "__main__":
    main()
