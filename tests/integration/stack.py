"""A real service stack for tests: per-run Postgres database and Redis key prefix, `item worker` processes."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from celery import Celery

from pipeline.core.detector import Detector
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker.gpu.build import build_service
from worker.ledger import migrate
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.settings import Settings

ITEM = Path(sys.executable).parent / "item"
REDIS_URL = os.environ.get("ITEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = {"done", "rejected", "failed"}


@dataclass
class Stack:
    env: dict[str, str]
    ledger: Ledger
    redis: redis.Redis
    prefix: str
    folder: Path

    @property
    def settings(self) -> Settings:
        # As pydantic-settings reads the environment: complex (list, dict) values arrive as JSON.
        keys = {k[len("ITEM_") :].lower(): v for k, v in self.env.items() if k.startswith("ITEM_")}
        return Settings(**{k: json.loads(v) if v.startswith(("[", "{")) else v for k, v in keys.items()})

    def image(self, seed: int, fmt: str = "PNG") -> Path:
        path = self.folder / f"image-{seed}.{fmt.lower()}"
        path.write_bytes(encode(noise_image(seed, 64 + seed % 5 * 8, 72), fmt))
        return path

    def submit(self, *args: str) -> list[dict]:
        result = run_item(self.env, "submit", "--json", *args)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_terminal(self, check_ids: list[str], timeout: float = 90.0) -> dict[str, CheckRow]:
        deadline = time.monotonic() + timeout
        while True:
            with self.ledger.session() as session:
                rows = {cid: self.ledger.get_check(session, cid) for cid in check_ids}
            if all(row is not None and row.status in TERMINAL for row in rows.values()):
                return rows
            if time.monotonic() > deadline:
                states = {cid: (row.status if row else None) for cid, row in rows.items()}
                pytest.fail(f"checks not finished in {timeout}s: {states}")
            time.sleep(0.3)

    def queue_length(self) -> int:
        return self.redis.llen(f"{self.prefix}item.checks")

    def push_raw(self, kwargs: dict, *, task: str = "item.check", args: list | None = None) -> None:
        """LPUSH a Celery protocol-2 JSON message, as a client in any language can (no Celery, no ledger row)."""
        self.push_message(celery_json_message(kwargs, task=task, args=args))

    def push_message(self, message: dict) -> None:
        self.redis.lpush(f"{self.prefix}item.checks", json.dumps(message))

    def send(self, **kwargs) -> None:
        """An `item.check` message as a platform's own Celery client sends it (JSON, protocol 2)."""
        platform_client(self.env["ITEM_BROKER_URL"], self.prefix).send_task(
            "item.check", kwargs=kwargs, queue="item.checks"
        )


class Worker:
    """`item worker` in its own process group, so a test can SIGKILL the whole tree at once."""

    def __init__(
        self, stack: Stack, name: str, concurrency: int = 1, env: dict[str, str] | None = None, wait_ready: bool = True
    ):
        self.name = name
        self.env = env or stack.env
        self.log = stack.folder / f"{name}.log"
        self.process = subprocess.Popen(
            [str(ITEM), "worker", "--concurrency", str(concurrency), "--loglevel", "INFO"],
            env=self.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started = time.monotonic()
        if wait_ready:
            self.wait_for(r"ready\.", 90)
        self.started_in = time.monotonic() - started  # to "ready.": imports, models loaded, version registered

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker never logged {pattern!r}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def model_images(self) -> int:
        return sum(int(n) for n in re.findall(r"model_images=(\d+)", self.log.read_text()))

    def version_id(self) -> str:
        """The pipeline version its GPU loops serve, as they announce it once ready."""
        return re.findall(r"ready: (pv-[0-9a-f]+)", self.log.read_text())[-1]

    def gpu_pids(self) -> list[int]:
        """The process ids of its GPU loops, in the order they were started (replacements last)."""
        return [int(pid) for pid in re.findall(r"GPU loop \d+ starting \(pid (\d+)\)", self.log.read_text())]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:  # a worker that outlives its test would take later tests' messages
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
                raise

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def celery_json_message(kwargs: dict, *, task: str = "item.check", args: list | None = None) -> dict:
    """The envelope of a Celery protocol-2 message with a JSON body, as it lies in a Redis list."""
    task_id = str(uuid.uuid4())
    body = [args or [], kwargs, {"callbacks": None, "errbacks": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "js", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "item.checks"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def platform_client(broker_url: str, prefix: str = "") -> Celery:
    """A platform's Celery app, configured as the README tells a platform to: JSON, and the deployment's prefix."""
    app = Celery("platform", broker=broker_url, set_as_current=False)
    options = {"global_keyprefix": prefix} if prefix else {}
    app.conf.update(task_serializer="json", broker_transport_options={**options, "confirm_publish": True})
    return app


def run_item(env: dict, *args: str, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ITEM), *args], env=env, capture_output=True, text=True, timeout=300)
    if check_exit is not None:
        assert result.returncode == check_exit, result.stdout + result.stderr
    return result


def tiny_models(folder: Path) -> ModelStore:
    """A model folder with the tiny profile generated into it, for benchmarks run outside pytest."""
    store = ModelStore(folder, allow_download=False)
    for spec in get_profile("tiny").specs.values():
        store.locate(spec)
    return store


def make_stack(postgres_url: str, tiny_store, folder: Path, **overrides: str):
    """Yields a Stack; cleans its Redis keys afterwards. Overrides are ITEM_* variables."""
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    head_path = random_head(detector).save(folder / "head.safetensors")
    prefix = f"item-test-{uuid.uuid4().hex[:10]}:"
    env = {
        **os.environ,
        "ITEM_PROFILE": "tiny",
        "ITEM_MODEL_DIR": str(tiny_store.model_dir),
        "ITEM_ALLOW_DOWNLOAD": "false",
        "ITEM_HEAD": str(head_path),
        "ITEM_DEVICE": "cpu",
        "ITEM_DATABASE_URL": postgres_url,
        "ITEM_BROKER_URL": REDIS_URL,
        "ITEM_REDIS_KEY_PREFIX": prefix,
        "ITEM_BATCH_SIZE": "4",
        "ITEM_BATCH_MAX_WAIT_S": "0.3",
        "ITEM_BATCH_TIME_BUDGET_S": "8",
        "ITEM_LEASE_S": "3",  # a killed worker's checks are claimed again 3 s later
        "ITEM_IDLE_POLL_S": "0.5",
        "ITEM_RECONCILE_AFTER_S": "10",
        "ITEM_RECONCILE_INTERVAL_S": "2",
        "ITEM_RETRY_BACKOFF_S": "0.5",
        "ITEM_ALLOWED_PATH_ROOTS": json.dumps([str(folder)]),
        "HF_HUB_OFFLINE": "1",
        "ITEM_METRICS_PORT": "0",  # off unless a test asks for it
        "ITEM_METRICS_DIR": str(folder / "metrics"),
        **overrides,
    }
    migrate.upgrade(postgres_url)
    client = redis.Redis.from_url(REDIS_URL)
    stack = Stack(env, Ledger(postgres_url), client, prefix, folder)
    build_service(stack.settings).register_version()  # as a first worker would, so tests may submit before any
    yield stack  # worker runs

    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@dataclass
class ImageServer:
    """An image server on 127.0.0.1 (allow it with ITEM_FETCH_ALLOWED_NETWORKS): /image.png answers at once,
    /hang.png promises an image and drips it far slower than any budget allows, /busy.png answers 503; every
    request's path and time is kept."""

    url: str
    requests: list[tuple[str, float]] = field(default_factory=list)


@contextmanager
def image_server() -> Iterator[ImageServer]:
    png = encode(noise_image(7))
    server: ImageServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append((self.path, time.monotonic()))
            if self.path == "/image.png":
                self._headers(200, len(png))
                self.wfile.write(png)
            elif self.path == "/hang.png":
                self._headers(200, len(png))
                for byte in png[:200]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.5)
            elif self.path == "/busy.png":
                self._headers(503, 0)
            else:
                self.send_error(404)

        def _headers(self, status: int, length: int) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def handle(self) -> None:
            with suppress(BrokenPipeError, ConnectionResetError):  # a worker gave up on a hanging download
                super().handle()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = ImageServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(BaseHTTPRequestHandler):
    """A test server's request handler: no log line per request, and `answer` for a plain 200."""

    def answer(self, body: bytes, content_type: str = "image/png", length: int | None = -1) -> None:
        """200 with `body`; `length` is the Content-Length said (-1: the body's; None: none). A client that gave
        up meanwhile is no error."""
        with suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", str(len(body) if length == -1 else length))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def local_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` on a threaded HTTP server at 127.0.0.1, yielding its base URL (allow it with
    ITEM_FETCH_ALLOWED_NETWORKS); a deep accept queue, as the default 5 drops concurrent connects, which then wait
    a second to retry."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    httpd = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def serve_images(images: dict[str, bytes], delay_s: float = 0.0) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 answering `/<name>` with `images[name]` (read at request time) after
    `delay_s`, 404 otherwise; yields its base URL. Allow it with ITEM_FETCH_ALLOWED_NETWORKS."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            body = images.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            time.sleep(delay_s)
            self.answer(body, "application/octet-stream")

    with local_server(Handler) as base:
        yield base
