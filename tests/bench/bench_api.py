"""`POST /v1/checks` under load: requests per second, latency percentiles, and that nothing is lost.

Run on demand, never as a timed test (needs `wrk`: `apt-get install wrk`; PostgreSQL as for the integration
tests, `ITEM_TEST_POSTGRES_URL`):
    python -m tests.bench.bench_api [--seconds 20 --connections 32 --threads 2 --workers 2 --image url --json]

A new database is migrated with the real migrations and given one pipeline version (registered as a worker
would, without loading models: the API runs none) and a `submit` key. `item serve` runs as its own processes
(--workers of them); wrk sends POST /v1/checks with a unique external id per request (wrk's Lua counter per
thread), each a URL image (--image url) or a small inline PNG (--image b64, which stores a blob per request).
wrk reports requests/s and the latency distribution; afterwards the ledger's rows are counted against the
answers wrk received: every 202 is a queued check, and no check exists that no request filed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from tests.conftest import encode, noise_image
from tests.integration.brokers import free_port
from tests.integration.conftest import temporary_postgres_database
from worker.ledger import migrate
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.web.keys import create_key

ITEM = Path(sys.executable).parent / "item"
LUA = """
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)  -- a global of that thread's own Lua state
end
function init(args)
  prefix = "bench-" .. thread_id .. "-"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer KEY"
end
function request()
  counter = counter + 1
  return wrk.format(nil, "/v1/checks", nil, '{"external_id": "' .. prefix .. counter .. '", "image": IMAGE}')
end
function done(summary, latency, requests)
  io.write("p50_us=" .. latency:percentile(50) .. " p90_us=" .. latency:percentile(90) .. " p99_us=" ..
           latency:percentile(99) .. " max_us=" .. latency.max .. "\\n")
end
"""


def main() -> None:
    args = _arguments()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    with temporary_postgres_database() as url:
        migrate.upgrade(url)
        key = _prepare(url)
        report = _run(args, url, key)
    print(json.dumps(report, indent=None if args.json else 2))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="`item serve --workers`")
    parser.add_argument("--image", choices=("url", "b64"), default="url")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def _prepare(url: str) -> str:
    ledger = Ledger(url)
    version = PipelineVersion("caption:bench", "ground:bench", "embed:bench", "head:bench")
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, version, "bench", activate=True)
    key = create_key(ledger, "bench", ["submit"]).key
    ledger.dispose()
    return key


def _image_json(kind: str) -> str:
    if kind == "url":
        return '{"url": "https://images.example.com/upload.jpg"}'
    return json.dumps({"b64": base64.b64encode(encode(noise_image(0, 64, 48))).decode()})


def _run(args, url: str, key: str) -> dict:
    port = free_port()
    env = {**os.environ, "ITEM_DATABASE_URL": url, "ITEM_HTTP_PORT": str(port)}
    server = subprocess.Popen([ITEM, "serve", "--workers", str(args.workers)], env=env)
    try:
        _wait(f"http://127.0.0.1:{port}/healthz")
        with tempfile.TemporaryDirectory() as folder:
            script = Path(folder) / "post.lua"
            script.write_text(LUA.replace("KEY", key).replace("IMAGE", _lua_literal(_image_json(args.image))))
            command = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.seconds}s", "--latency",
                       "-s", str(script), f"http://127.0.0.1:{port}"]  # fmt: skip
            load_before = os.getloadavg()
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        time.sleep(1)  # the last answers' transactions have committed before wrk saw them; this is for safety
    finally:
        server.terminate()
        server.wait(20)
    return _report(args, output, _rows(url), load_before)


def _lua_literal(image: str) -> str:
    """The image JSON as it goes inside the request body's single-quoted Lua string."""
    return image.replace("\\", "\\\\").replace("'", "\\'")


def _rows(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        query = sa.select(CheckRow.status, sa.func.count()).group_by(CheckRow.status)
        counts = {str(status): int(n) for status, n in connection.execute(query)}
        distinct = connection.execute(sa.select(sa.func.count(sa.distinct(CheckRow.external_id)))).scalar_one()
    engine.dispose()
    return {**counts, "distinct_external_ids": int(distinct)}


def _report(args, output: str, rows: dict, load_before) -> dict:
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    latency = {name: int(float(value)) / 1000 for name, value in re.findall(r"(p\d+|max)_us=([\d.]+)", output)}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {_cpu_name()}",
        "command": " ".join(sys.argv),
        "settings": {k: getattr(args, k) for k in ("seconds", "connections", "threads", "workers", "image")},
        "requests": requests,
        "requests_per_s": rate,
        "latency_ms": {f"{name}": ms for name, ms in latency.items()},
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
        "ledger_rows": rows,
        "lost": max(0, requests - (int(bad.group(1)) if bad else 0) - rows.get("queued", 0)),
        "load_average_before": load_before,
        "wrk": output,
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _wait(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    sys.exit(f"item serve did not come up at {url}")


if __name__ == "__main__":
    main()
