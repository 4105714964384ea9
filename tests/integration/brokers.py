"""Brokers of a test's own, on free ports: a redis-server or a RabbitMQ node that the test may kill and restart.

The machine's own Redis and RabbitMQ are never restarted: a test that takes a broker down starts its own here.
Each keeps its data in a folder of the test's, so a restart finds what that broker would keep on disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the Debian package's; the wrapper in PATH su's


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the broker exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the broker did not listen on {port} within {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_until_closed(port: int, timeout: float = 30) -> None:
    """Until nothing accepts on `port`: a killed server's last process may hold its socket a moment longer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                time.sleep(0.1)
        except OSError:
            return
    pytest.fail(f"port {port} still accepts connections {timeout}s after its server was killed")


class _Server:
    process: subprocess.Popen | None = None
    port: int

    def kill(self) -> None:
        """SIGKILL to every process of the server: a crash, not a shutdown (nothing is flushed that was not)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            _wait_until_closed(self.port)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def start(self) -> None:
        raise NotImplementedError


class RedisServer(_Server):
    """`redis-server` on its own port; `appendfsync` None keeps nothing on disk, else an append-only file."""

    def __init__(self, folder: Path, appendfsync: str | None = None):
        self.folder = folder
        self.port = free_port()
        self.appendfsync = appendfsync
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        durability = ["--appendonly", "no"]
        if self.appendfsync:
            durability = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        log = self.folder / "redis.log"
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *durability]
        command += ["--dir", str(self.folder), "--logfile", str(log)]
        self.process = subprocess.Popen(command, start_new_session=True)
        log.touch()
        _wait_for_port(self.port, 20, self.process, log)


class RabbitServer(_Server):
    """A RabbitMQ node of its own (name, ports, data folder), as Debian's package installs the server."""

    def __init__(self, folder: Path):
        if not RABBITMQ_SERVER.exists() or shutil.which("epmd") is None:
            pytest.fail(f"RabbitMQ is required for these tests ({RABBITMQ_SERVER}; Debian package rabbitmq-server)")
        self.folder = folder
        self.port = free_port()
        self.name = f"item-test-{self.port}@localhost"
        self.env = {
            **os.environ,
            "HOME": str(folder),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(folder / "pid"),
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        log = self.folder / "server.log"
        self.process = subprocess.Popen(
            [str(RABBITMQ_SERVER)], env=self.env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait_for_port(self.port, 90, self.process, log)
        self._wait_for_amqp(log)

    def _wait_for_amqp(self, log: Path, timeout: float = 90) -> None:
        """Until an AMQP handshake succeeds: the port opens before the broker is ready to talk."""
        from kombu import Connection

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with Connection(self.url, connect_timeout=2) as connection:
                    connection.ensure_connection(max_retries=0)
                    return
            except Exception:
                time.sleep(0.3)
        pytest.fail(f"RabbitMQ never answered on {self.port}:\n{log.read_text()[-3000:]}")
