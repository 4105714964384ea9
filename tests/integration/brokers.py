"""Brokers of a test's own, on free ports: a redis-server or a RabbitMQ node that the test may kill and restart.

The machine's own Redis and RabbitMQ are never restarted: a test that takes a broker down starts its own here.
Each keeps its data in a folder of the test's, so a restart finds what that broker would keep on disk.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # the Debian package's; the wrapper in PATH su's


def _port_range() -> range:
    """This pytest process's own ports: a share, by xdist worker, of those below the kernel's ephemeral range.

    A port found free is bound later, by a server in another process. Taken from the ephemeral range (a bind to
    port 0), another xdist worker's free port or any outgoing connection (to Postgres, Redis...) may take it in
    between; below that range, and in a share no other worker draws from, nothing else hands it out.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 20000 if ephemeral_low > 24000 else 10000
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    share = (ephemeral_low - low) // max(workers, 1)
    return range(low + index * share, low + (index + 1) * share)


_PORTS = _port_range()
_next_port = random.randrange(len(_PORTS))  # another pytest session on this machine most likely starts elsewhere


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now, never handed out twice in a row by this process (see _port_range)."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _PORTS[_next_port % len(_PORTS)]
        _next_port += 1
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # the whole share taken: whatever the kernel gives
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
