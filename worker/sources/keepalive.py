"""Idle keep-alive connections of result callbacks, a few per receiver, so a busy receiver is not sent a TCP
(and TLS) handshake per result.

Only sockets `worker.sources.fetch.post` opened itself are kept: each was connected to an address checked
against the address policy when it was opened, so reusing one never bypasses the private-address refusal. A
kept socket is given up once it has idled for IDLE_S (before common server idle timeouts: Node's is 5 s) or
lived for LIFE_S (so the name is looked up, and its addresses checked, again now and then), when its receiver
closed it meanwhile, and beyond PER_HOST idle sockets per receiver or HOSTS receivers: the pool stays bounded
whatever the callback URLs.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections import OrderedDict

IDLE_S = 4.0
LIFE_S = 300.0
PER_HOST = 8  # as many as the deliverer sends at once (SENDS_AT_ONCE)
HOSTS = 256

Key = tuple  # scheme, host, port and the address policy the socket's address was checked under


class KeptConnections:
    """Idle sockets per receiver (scheme, host, port, address policy), newest first out; thread-safe."""

    def __init__(self, per_host: int = PER_HOST, hosts: int = HOSTS):
        self.per_host = per_host
        self.hosts = hosts
        self._idle: OrderedDict[Key, list[tuple[socket.socket, float, float]]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: Key) -> tuple[socket.socket, float] | None:
        """An idle socket to `key` still open (and when it was opened), or None: the caller opens one."""
        while True:
            with self._lock:
                kept = self._idle.get(key)
                if not kept:
                    return None
                sock, opened, idle_since = kept.pop()
            now = time.monotonic()
            if now - idle_since < IDLE_S and now - opened < LIFE_S and _open_and_quiet(sock):
                return sock, opened
            _close(sock)

    def put(self, key: Key, sock: socket.socket, opened: float) -> None:
        """Keeps a socket whose last answer was read whole; closes it when the pool is full."""
        dropped: list[socket.socket] = []
        with self._lock:
            kept = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(kept) < self.per_host:
                kept.append((sock, opened, time.monotonic()))
            else:
                dropped.append(sock)
            while len(self._idle) > self.hosts:
                _, gone = self._idle.popitem(last=False)
                dropped += [old for old, _, _ in gone]
        for old in dropped:
            _close(old)

    def close(self) -> None:
        with self._lock:
            every = [sock for kept in self._idle.values() for sock, _, _ in kept]
            self._idle.clear()
        for sock in every:
            _close(sock)


def _open_and_quiet(sock: socket.socket) -> bool:
    """An idle connection with something to read was closed by its receiver (or sends what nobody asked for)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
