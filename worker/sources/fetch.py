"""Downloads an image by URL for a server that sits inside a private network, without becoming a way into it.

A URL sent by a platform is untrusted input: pointed at 169.254.169.254, 10.x.x.x or localhost, a naive fetch
would read cloud credentials or poke internal services for the sender (SSRF). So every hop of a fetch, each
redirect included, is checked the same way: the URL's shape, then every address its host resolves to against an
`AddressPolicy`. The connection is then made to exactly the address that was checked, never by name again, so a
DNS server cannot answer differently the second time (rebinding); `Host` and TLS still use the name. Size and
time are capped for the whole fetch, redirects included. No cookies or credentials are sent, and proxy settings
in the environment are ignored: a proxy would connect by name, out of reach of these checks.

Every refusal is a `FetchError` (`worker.sources.addresses`) with a stable code; `permanent` says whether trying
again can ever help:

    url.invalid             permanent  cannot be parsed: bad port, bad IPv6 literal, whitespace or control chars
    url.refused             permanent  not http(s), has user:password@, no host, or resolves to a blocked address
    url.unresolvable        permanent  DNS says the name does not exist or has no address
    url.too_many_redirects  permanent  more than `max_redirects` redirects
    url.too_large           permanent  the body is (or says it will be) over `max_bytes`
    url.http_4xx            permanent  except 408, 425 and 429, which ask the client to come back later
    url.http_5xx            transient
    url.http_status         permanent  any other answer that is neither 2xx nor a usable redirect
    url.tls                 permanent  the server's certificate does not verify for the host name
    url.connection          transient  refused, reset, unreachable, DNS failing for now, body cut short, TLS errors
    url.timeout             transient  the whole fetch took longer than `timeout_s`

`post` sends a body (result callbacks) under the same rules: checked addresses only, one time budget for the
whole request, no proxy. It follows no redirect: a 3xx is an answer like any other non-2xx. Its connections may be
kept alive between callbacks to one receiver (`worker.sources.keepalive`): only ever to an address checked when opened.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NamedTuple
from urllib.parse import quote, urljoin, urlsplit

from worker.sources.addresses import DEFAULT_POLICY, AddressPolicy, FetchError
from worker.sources.keepalive import KeptConnections
from worker.sources.lookups import LOOKUPS

Resolver = Callable[..., Sequence[tuple[Any, ...]]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# The server asks to be asked again later: retrying these can succeed, unlike the rest of 4xx.
RETRYABLE_4XX = frozenset({408, 425, 429})
DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
_PRINTABLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))  # quote() with these safe encodes only non-ASCII
_NAME_NOT_FOUND = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _package_version() -> str:
    try:
        return version("item-moderation")
    except PackageNotFoundError:
        return "0"


USER_AGENT = f"item-moderation/{_package_version()}"


@dataclass(frozen=True)
class Target:
    """One URL taken apart into what the request needs; `host` is ASCII (IDNA), without IPv6 brackets."""

    scheme: str
    host: str
    port: int
    request_path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def shown(self) -> str:
        """The URL for messages, without its query, which may carry signatures or tokens."""
        return f"{self.scheme}://{self.host_header}{self.request_path.split('?', 1)[0]}"


def parse_target(url: str) -> Target:
    """Checks the URL's shape (http(s), a host, no credentials) and returns what the request needs."""
    if any(char <= " " or char == "\x7f" for char in url):
        raise FetchError("The URL contains whitespace or control characters.", code="url.invalid")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise FetchError(f"The URL cannot be parsed: {error}.", code="url.invalid") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise FetchError(
            f"Only http and https URLs are fetched, not {parts.scheme or 'scheme-less'} ones.", code="url.refused"
        )
    if "@" in parts.netloc:
        raise FetchError("URLs with credentials (user:password@) are refused.", code="url.refused")
    if not parts.hostname:
        raise FetchError("The URL has no host.", code="url.refused")
    if port == 0:
        raise FetchError("The URL's port is 0.", code="url.invalid")
    path = quote(parts.path or "/", safe=_PRINTABLE_ASCII)
    query = f"?{quote(parts.query, safe=_PRINTABLE_ASCII)}" if parts.query else ""
    return Target(parts.scheme, _ascii_host(parts.hostname), port or DEFAULT_PORTS[parts.scheme], path + query)


def _ascii_host(hostname: str) -> str:
    if ":" in hostname:  # an IPv6 literal
        return hostname
    try:
        return hostname.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise FetchError(f"The URL's host {hostname!r} is not a valid name: {error}.", code="url.invalid") from None


@dataclass(frozen=True)
class _Budget:
    """The time left for the whole fetch: every blocking call gets only what is left, never a fresh timeout."""

    timeout_s: float
    deadline: float
    what: str = "The download"  # what took too long, for the message

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        return left

    def exceeded(self) -> FetchError:
        return FetchError(f"{self.what} took longer than {self.timeout_s:g} s.", code="url.timeout", permanent=False)


class _Redirect(NamedTuple):
    location: str


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    max_redirects: int = 3,
    policy: AddressPolicy = DEFAULT_POLICY,
    resolve: Resolver = socket.getaddrinfo,
) -> bytes:
    """The body of `url`, with every hop checked and connected to by checked address; raises `FetchError`.

    `resolve` has `socket.getaddrinfo`'s signature; tests inject fake names through it.
    """
    budget = _Budget(timeout_s, time.monotonic() + timeout_s)
    first = parse_target(url)
    for hop in range(max_redirects + 1):
        with _naming_the_origin(first if hop else None):
            outcome = _fetch_once(parse_target(url), policy, resolve, max_bytes, budget)
        if not isinstance(outcome, _Redirect):
            return outcome
        url = urljoin(url, outcome.location)
    raise FetchError(f"{first.shown} redirects more than {max_redirects} times.", code="url.too_many_redirects")


@contextmanager
def _naming_the_origin(first: Target | None) -> Iterator[None]:
    """A refusal met after a redirect names the URL it came from: that is the one the caller knows."""
    try:
        yield
    except FetchError as error:
        if first is None:
            raise
        message = f"{error.message} (redirected from {first.shown})"
        raise FetchError(message, code=error.code, permanent=error.permanent) from error


def _fetch_once(
    target: Target, policy: AddressPolicy, resolve: Resolver, max_bytes: int, budget: _Budget
) -> bytes | _Redirect:
    with _network_errors(target, budget):
        addresses = checked_addresses(target, policy, resolve, budget)
        with _open(target, addresses, budget) as sock:
            connection = http.client.HTTPConnection(target.host, target.port)
            connection.sock = _DeadlineSocket(sock, budget)  # already connected: http.client never connects itself
            _send_get(connection, target)
            return _outcome(connection.getresponse(), target, max_bytes)


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    policy: AddressPolicy = DEFAULT_POLICY,
    resolve: Resolver = socket.getaddrinfo,
    kept: KeptConnections | None = None,
) -> int:
    """POSTs `body` to `url`, checked and connected to exactly as `fetch_url` does; returns the 2xx status.

    Any other answer raises `FetchError` (url.http_5xx, url.http_4xx, or url.http_status for 1xx/3xx: redirects
    are not followed, since a redirected POST would need its own checks and the receiver owns its URL), its
    message ending with the start of the response body, which is never read further. Host, Content-Length,
    User-Agent and Connection are set here; `headers` adds the rest.

    With `kept` the connection is kept alive: taken from `kept` when one to the same receiver is idle there (it
    was opened to a checked address), and given back after a 2xx answer read whole. A kept connection the
    receiver closed before answering is replaced, once, by a new one (delivery is at least once anyway).
    """
    budget = _Budget(timeout_s, time.monotonic() + timeout_s, "The request")
    target = parse_target(url)
    request = _Post(target, body, headers, budget, kept, policy)
    with _network_errors(target, budget, doing="Posting to"):
        reused = kept.take(request.key) if kept is not None else None
        if reused is not None:
            with contextlib.suppress(_Stale):
                return request.over(*reused, reused=True)
        addresses = checked_addresses(target, policy, resolve, budget)
        return request.over(_open(target, addresses, budget), time.monotonic(), reused=False)


class _Stale(Exception):
    """A kept connection its receiver had closed while it idled: nothing was answered on it."""


_KEPT_ANSWER_MAX = 64 * 1024  # a 2xx body read to reuse its connection; a longer one closes it instead


@dataclass(frozen=True)
class _Post:
    target: Target
    body: bytes
    headers: Mapping[str, str]
    budget: _Budget
    kept: KeptConnections | None
    policy: AddressPolicy

    @property
    def key(self) -> tuple:
        """Whose idle connections this request may take: the same receiver, checked under the same policy."""
        return self.target.scheme, self.target.host, self.target.port, self.policy

    def over(self, sock: socket.socket, opened: float, *, reused: bool) -> int:
        """Sends the request on `sock` and reads the answer; `sock` is kept or closed, whatever happens."""
        keep = False
        try:
            connection = http.client.HTTPConnection(self.target.host, self.target.port)
            connection.sock = _DeadlineSocket(sock, self.budget)
            try:
                _send_post(connection, self.target, self.body, self.headers, keep_alive=self.kept is not None)
                response = connection.getresponse()
            except ConnectionError as error:  # RemoteDisconnected included: no answer came
                if reused:
                    raise _Stale from error
                raise
            if not 200 <= response.status < 300:
                error = _status_error(response.status, response.reason, self.target)
                said = _body_start(response)
                raise FetchError(f"{error.message} {said}".rstrip(), code=error.code, permanent=error.permanent)
            keep = self.kept is not None and _read_to_end(response)
            return response.status
        finally:
            if keep:
                self.kept.put(self.key, sock, opened)
            else:
                sock.close()


def _read_to_end(response: http.client.HTTPResponse) -> bool:
    """Reads a 2xx answer's body so its connection can carry the next request; False when it cannot."""
    if response.will_close or (response.length is not None and response.length > _KEPT_ANSWER_MAX):
        return False
    try:
        response.read(_KEPT_ANSWER_MAX)
    except (OSError, http.client.HTTPException, FetchError):  # the answer counts; only the connection goes
        return False
    return response.isclosed()


def _send_post(
    connection: http.client.HTTPConnection,
    target: Target,
    body: bytes,
    headers: Mapping[str, str],
    *,
    keep_alive: bool = False,
) -> None:
    connection.putrequest("POST", target.request_path, skip_host=True, skip_accept_encoding=True)
    fixed = {"Host": target.host_header, "User-Agent": USER_AGENT, "Content-Length": str(len(body))}
    for name, value in {**headers, **fixed, "Connection": "keep-alive" if keep_alive else "close"}.items():
        connection.putheader(name, value)
    connection.endheaders(body)


_BODY_SHOWN = 200  # characters of an error answer kept in the message: enough for "invalid signature"


def _body_start(response: http.client.HTTPResponse) -> str:
    """The first characters of an error answer, printable only; empty when it cannot be read in time."""
    try:
        head = response.read(_BODY_SHOWN * 4)
    except (OSError, http.client.HTTPException, FetchError):  # FetchError: the time budget ran out
        return ""
    text = " ".join(head.decode("utf-8", "replace").split())
    return "".join(char for char in text if char.isprintable())[:_BODY_SHOWN]


@contextmanager
def _network_errors(target: Target, budget: _Budget, doing: str = "Fetching") -> Iterator[None]:
    """Turns what DNS, sockets, TLS and http.client raise into FetchErrors that say whether a retry can help."""
    try:
        yield
    except TimeoutError:
        raise budget.exceeded() from None
    except socket.gaierror as error:
        if error.errno in _NAME_NOT_FOUND:
            raise FetchError(f"{target.host} does not resolve: {error.strerror}.", code="url.unresolvable") from error
        raise FetchError(
            f"Looking up {target.host} failed: {error.strerror}.", code="url.connection", permanent=False
        ) from error
    except ssl.SSLCertVerificationError as error:
        raise FetchError(f"{target.shown}: TLS certificate refused: {error.verify_message}.", code="url.tls") from error
    except (OSError, http.client.HTTPException) as error:
        raise FetchError(
            f"{doing} {target.shown} failed: {str(error) or type(error).__name__}.",
            code="url.connection",
            permanent=False,
        ) from error


def checked_addresses(
    target: Target, policy: AddressPolicy, resolve: Resolver, budget: _Budget
) -> list[tuple[int, tuple[Any, ...]]]:
    """Every (family, sockaddr) the host resolves to, each one checked.

    One blocked address refuses the whole host: which of several addresses a connection would use is up to the
    resolver's order and the network, so all of them must be safe.
    """
    infos = _resolve_within(target, resolve, budget)
    if not infos:
        raise FetchError(f"{target.host} resolves to no address.", code="url.unresolvable")
    for *_, sockaddr in infos:
        # Literal hosts in any form inet_aton accepts (2130706433, 0x7f.1) come back canonical from the resolver.
        policy.check(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), host=target.host)
    return list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in infos))


def _resolve_within(target: Target, resolve: Resolver, budget: _Budget) -> Sequence[tuple[Any, ...]]:
    """getaddrinfo takes no timeout, so the lookup runs on one of the process's lookup threads (`LOOKUPS`), and
    is abandoned there when it is late."""
    work = functools.partial(resolve, target.host, target.port, type=socket.SOCK_STREAM)
    return LOOKUPS.run(target.host, work, budget.deadline, budget.exceeded)


def _open(target: Target, addresses: list[tuple[int, tuple[Any, ...]]], budget: _Budget) -> socket.socket:
    """A connected socket to a checked address, TLS-wrapped for https with the certificate checked for the name."""
    sock = _connect(addresses, budget)
    if target.scheme == "http":
        return sock
    try:
        sock.settimeout(budget.left())
        return _tls_context().wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise


def _connect(addresses: list[tuple[int, tuple[Any, ...]]], budget: _Budget) -> socket.socket:
    """Tries each checked address in turn, as socket.create_connection would, but only those."""
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        timeout = budget.left()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as failure:
            sock.close()
            error = failure
    raise error


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _DeadlineSocket:
    """The socket http.client is given: every send and receive gets only the time left in the budget.

    A plain socket timeout restarts with each recv, so a server dripping one byte at a time could hold a fetch
    open for ever. Closing is left to `_fetch_once`, which owns the socket: http.client closes "its" socket as
    soon as a `Connection: close` response starts, while the body is still to be read.
    """

    def __init__(self, sock: socket.socket, budget: _Budget):
        self._sock = sock
        self._budget = budget

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._budget.left())
        self._sock.sendall(data)

    def recv_into(self, buffer: Any) -> int:
        self._sock.settimeout(self._budget.left())
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        pass


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)


def _send_get(connection: http.client.HTTPConnection, target: Target) -> None:
    # http.client would derive Host from the address it was given; it must be the name (and no ":443").
    connection.putrequest("GET", target.request_path, skip_host=True)
    for name, value in (
        ("Host", target.host_header),
        ("User-Agent", USER_AGENT),
        ("Accept", "image/*"),
        ("Connection", "close"),
    ):
        connection.putheader(name, value)
    connection.endheaders()


def _outcome(response: http.client.HTTPResponse, target: Target, max_bytes: int) -> bytes | _Redirect:
    status = response.status
    location = response.getheader("Location")
    if status in REDIRECT_STATUSES and location:
        return _Redirect(location.strip())
    if 200 <= status < 300:
        return _read_capped(response, target, max_bytes)
    raise _status_error(status, response.reason, target)


def _read_capped(response: http.client.HTTPResponse, target: Target, max_bytes: int) -> bytes:
    """The body, refused as soon as it is (or says it will be) over `max_bytes`, so a huge one is never held."""
    if response.length is not None and response.length > max_bytes:
        raise _too_large(target, max_bytes, f"says it is {response.length:,} bytes")
    declared, body = response.length, bytearray()
    while chunk := response.read(min(_CHUNK, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(target, max_bytes, "is larger")
    if declared is not None and len(body) < declared:  # read(amt) returns short at EOF instead of raising
        raise http.client.IncompleteRead(bytes(body), declared - len(body))
    return bytes(body)


def _too_large(target: Target, max_bytes: int, what: str) -> FetchError:
    return FetchError(f"{target.shown} {what}; the limit is {max_bytes:,} bytes.", code="url.too_large")


def _status_error(status: int, reason: str, target: Target) -> FetchError:
    answer = f"{target.shown} answered HTTP {status} {reason[:100]}".rstrip() + "."
    if 400 <= status < 500:
        return FetchError(answer, code="url.http_4xx", permanent=status not in RETRYABLE_4XX)
    if 500 <= status < 600:
        return FetchError(answer, code="url.http_5xx", permanent=False)
    return FetchError(answer, code="url.http_status")
