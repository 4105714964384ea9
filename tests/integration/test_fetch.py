"""`fetch_url` against a real HTTP server on 127.0.0.1, and the SSRF refusals around it.

Only the happy-path tests allow 127.0.0.1; everything else runs under the default policy, so loopback itself is
refused. A guard on `socket.connect` fails any test that tries to connect anywhere but 127.0.0.1, and names
that should be refused are served by a fake resolver: nothing here reaches the network beyond this machine.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from PIL import Image

from tests.conftest import encode, noise_image
from worker.sources import fetch
from worker.sources.fetch import AddressPolicy, FetchError, fetch_url

LOCAL = AddressPolicy(allowed=(ip_network("127.0.0.1/32"),))
PNG = encode(noise_image(0, 32, 24))
MiB = 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    """Routes by path; see each `_route_*` method. Bodies are close-delimited unless a length is sent."""

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        route = parts.path.strip("/").split("/")
        getattr(self, f"_route_{route[0].replace('-', '_')}", self._route_missing)(route[1:], parse_qs(parts.query))

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _route_missing(self, route, query) -> None:
        self._send(404, b"no such route")

    def _route_image(self, route, query) -> None:
        self._send(200, PNG, Content_Type="image/png", Content_Length=str(len(PNG)))

    def _route_unsized(self, route, query) -> None:  # no Content-Length: read until the server closes
        self._send(200, PNG, Content_Type="image/png")

    def _route_chunked(self, route, query) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for start in range(0, len(PNG), 100):
            piece = PNG[start : start + 100]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _route_headers(self, route, query) -> None:
        self._send(200, json.dumps(dict(self.headers.items())).encode())

    def _route_status(self, route, query) -> None:
        self._send(int(route[0]), b"status body")

    def _route_chain(self, route, query) -> None:  # /chain/N: N relative redirects, then the image
        hops = int(route[0])
        if hops == 0:
            self._route_image(route, query)
        else:
            self._send(302, Location=f"/chain/{hops - 1}")

    def _route_slowchain(self, route, query) -> None:  # every hop takes 0.15 s, for ever
        time.sleep(0.15)
        self._send(302, Location=f"/slowchain/{int(route[0]) + 1}")

    def _route_loop(self, route, query) -> None:
        self._send(301, Location="/loop")

    def _route_absolute(self, route, query) -> None:
        host, port = self.server.server_address[:2]
        self._send(307, Location=f"http://{host}:{port}/image")

    def _route_relative(self, route, query) -> None:  # /relative/deeper/ → ../../image, resolved by the client
        self._send(308, Location="../../image")

    def _route_to(self, route, query) -> None:  # /to?u=URL: a redirect to anywhere
        self._send(302, Location=query["u"][0])

    def _route_nolocation(self, route, query) -> None:
        self._send(302)

    def _route_slow(self, route, query) -> None:
        time.sleep(2)
        self._route_image(route, query)

    def _route_drip(self, route, query) -> None:  # one byte every 50 ms: each recv is quick, the whole is not
        self.send_response(200)
        self.end_headers()
        self._stream(b"x", pause_s=0.05, for_s=3)

    def _route_endless(self, route, query) -> None:
        self.send_response(200)
        self.end_headers()
        self._stream(b"\0" * 65536, pause_s=0, for_s=3)

    def _route_declared_large(self, route, query) -> None:  # says 10 MB, then stalls: only the header can refuse
        self.send_response(200)
        self.send_header("Content-Length", str(10 * MiB))
        self.end_headers()
        self.wfile.flush()
        time.sleep(2)

    def _route_short_length(self, route, query) -> None:  # says 10 bytes, sends a megabyte
        self._send(200, b"\1" * MiB, Content_Length="10")

    def _route_cut_short(self, route, query) -> None:  # says 1000 bytes, sends 10, hangs up
        self._send(200, b"\1" * 10, Content_Length="1000")

    def _route_hangup(self, route, query) -> None:
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def _stream(self, piece: bytes, *, pause_s: float, for_s: float) -> None:
        end = time.monotonic() + for_s
        try:
            while time.monotonic() < end:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(pause_s)
        except OSError:  # the client hung up, as it should
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # handlers still sleeping must not hold up the teardown

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exception(), ConnectionError):  # clients hanging up early is what tests do
            super().handle_error(request, client_address)


@dataclass
class Running:
    port: int
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def serve(scheme: str = "http", tls: ssl.SSLContext | None = None) -> Iterator[Running]:
    server = Server(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Running(server.server_address[1], scheme)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    yield from serve()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for the name img.test (and nothing else)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-days", "2", "-subj", "/CN=img.test", "-addext", "subjectAltName=DNS:img.test"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(certificate) -> Iterator[Running]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from serve("https", context)


@pytest.fixture(autouse=True)
def connections(monkeypatch) -> list[tuple]:
    """Every address this test connects to; connecting anywhere but 127.0.0.1 fails the test instead."""
    made: list[tuple] = []
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: tuple) -> None:
        if address[0] != "127.0.0.1":
            raise AssertionError(f"the test tried to connect to {address}")
        made.append(address[:2])
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return made


def addrinfo(address: str, port: int) -> tuple:
    if ":" in address:
        return socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0)
    return socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port)


@dataclass
class FakeResolver:
    """Names from a table (one list of answers per lookup, the last repeating); numeric hosts as the system
    reads them; any other name does not exist. Never asks DNS."""

    names: dict[str, list[list[str]]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int, *args, **kwargs) -> list[tuple]:
        self.asked.append(host)
        if host in self.names:
            answers = self.names[host]
            addresses = answers[min(self.asked.count(host), len(answers)) - 1]
            return [addrinfo(address, port) for address in addresses]
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)


def fake(**names: str | list[str]) -> FakeResolver:
    """fake(evil_test="10.0.0.7") answers evil.test with 10.0.0.7 on every lookup."""
    return FakeResolver({name.replace("_", "."): [[a] if isinstance(a, str) else a] for name, a in names.items()})


def refuse_lookups(host: str, *args, **kwargs):
    raise AssertionError(f"{host} should have been refused before any lookup")


def fails(url: str, *, max_bytes: int = MiB, timeout_s: float = 5.0, **options) -> FetchError:
    with pytest.raises(FetchError) as caught:
        fetch_url(url, max_bytes=max_bytes, timeout_s=timeout_s, **options)
    return caught.value


# ---------------------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("path", ["/image", "/unsized", "/chunked", "/chain/3", "/absolute", "/relative/deeper/"])
def test_fetches_the_image(server, path):
    data = fetch_url(server.url(path), max_bytes=MiB, timeout_s=5, policy=LOCAL)
    assert data == PNG
    assert Image.open(io.BytesIO(data)).size == (32, 24)


def test_connects_to_the_checked_address_and_sends_the_name(server, connections):
    resolver = fake(img_test="127.0.0.1")
    sent = json.loads(
        fetch_url(server.url("/headers", "img.test"), max_bytes=MiB, timeout_s=5, policy=LOCAL, resolve=resolver)
    )
    assert sent["Host"] == f"img.test:{server.port}"
    assert sent["User-Agent"] == fetch.USER_AGENT and fetch.USER_AGENT.startswith("item-moderation/")
    assert sent["Accept"] == "image/*" and sent["Accept-Encoding"] == "identity"
    assert not {"Cookie", "Authorization", "Proxy-Authorization"} & set(sent)
    assert resolver.asked == ["img.test"] and connections == [("127.0.0.1", server.port)]


def test_a_body_of_exactly_max_bytes_is_accepted(server):
    assert fetch_url(server.url("/unsized"), max_bytes=len(PNG), timeout_s=5, policy=LOCAL) == PNG


# ---------------------------------------------------------------------------------------------- URL shape


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://127.0.0.1/x.png", "url.refused"),
        ("file:///etc/passwd", "url.refused"),
        ("gopher://127.0.0.1:70/_x", "url.refused"),
        ("data:image/png;base64,iVBORw0KGgo=", "url.refused"),
        ("//127.0.0.1/x.png", "url.refused"),
        ("127.0.0.1/x.png", "url.refused"),
        ("http://user:secret@127.0.0.1/x.png", "url.refused"),
        ("http://@127.0.0.1/x.png", "url.refused"),
        ("http:///x.png", "url.refused"),
        ("http://[::1/x.png", "url.invalid"),
        ("http://127.0.0.1:99999/x.png", "url.invalid"),
        ("http://127.0.0.1:0/x.png", "url.invalid"),
        ("http://exa mple.test/x.png", "url.invalid"),
        ("http://img.test/x.png\r\nX-Injected: 1", "url.invalid"),
        ("http://a..b/x.png", "url.invalid"),
    ],
)
def test_bad_urls_are_refused_before_any_lookup(url, code, connections):
    error = fails(url, policy=LOCAL, resolve=refuse_lookups)
    assert (error.code, error.permanent) == (code, True)
    assert connections == []


# ---------------------------------------------------------------------------------------------- addresses

BLOCKED_HOSTS = [
    # IPv4
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "240.0.0.1",
    "198.18.0.1",
    "192.0.2.1",
    "203.0.113.9",
    # IPv6
    "[::1]",
    "[::]",
    "[fc00::1]",
    "[fd12:3456::1]",
    "[fe80::1]",
    "[ff02::1]",
    "[2001:db8::1]",
    # IPv6 carrying a blocked IPv4: mapped, compatible, 6to4, NAT64, and Teredo
    "[::ffff:127.0.0.1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:a9fe:a9fe]",
    "[::127.0.0.1]",
    "[2002:a00:1::1]",
    "[64:ff9b::a9fe:a9fe]",
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
    # integer, hex, octal and short forms inet_aton reads
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "017700000001",
    "127.1",
    "0",
    "3232235777",
    "0xa9fea9fe",
    "localhost",
]


@pytest.mark.parametrize("host", BLOCKED_HOSTS)
def test_blocked_hosts_are_refused_before_connecting(host, connections):
    # The system resolver, as in production: literals never reach DNS, and localhost comes from /etc/hosts.
    error = fails(f"http://{host}/latest/meta-data/")
    assert (error.code, error.permanent) == ("url.refused", True)
    assert connections == []


def test_the_default_policy_refuses_a_live_loopback_server(server, connections):
    error = fails(server.url("/image"))
    assert error.code == "url.refused" and "loopback" in error.message
    assert connections == []


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ("10.0.0.7", "private"),
        (["93.184.216.34", "192.168.1.1"], "private"),
        (["2606:2800:220:1::1", "fe80::1"], "link-local"),
        ("::ffff:10.1.2.3", "10.1.2.3, a private"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254, a link-local"),
        ("100.100.100.200", "carrier-grade NAT"),
    ],
)
def test_names_resolving_to_a_blocked_address_are_refused(answers, reason, connections):
    resolver = fake(evil_test=answers)
    error = fails("http://evil.test/x.png", resolve=resolver)
    assert (error.code, error.permanent) == ("url.refused", True)
    assert "evil.test" in error.message and reason in error.message
    assert resolver.asked == ["evil.test"] and connections == []


def test_allowed_exempts_the_address_only_as_resolved():
    LOCAL.check(ip_address("127.0.0.1"))
    with pytest.raises(FetchError, match="carrying 127.0.0.1"):
        LOCAL.check(ip_address("::ffff:127.0.0.1"))
    with pytest.raises(FetchError, match="loopback"):
        LOCAL.check(ip_address("127.0.0.2"))


def test_a_name_is_resolved_once_per_hop_and_never_again_to_connect(server, connections):
    # A rebinding DNS server: the safe answer first, a private one for every later lookup.
    resolver = FakeResolver({"flip.test": [["127.0.0.1"], ["10.0.0.1"]]})
    assert (
        fetch_url(server.url("/image", "flip.test"), max_bytes=MiB, timeout_s=5, policy=LOCAL, resolve=resolver) == PNG
    )
    assert resolver.asked == ["flip.test"] and connections == [("127.0.0.1", server.port)]
    # The next hop (a relative redirect, same name) is looked up again, and this time refused.
    error = fails(server.url("/chain/1", "flip.test"), policy=LOCAL, resolve=resolver)
    assert error.code == "url.refused" and "10.0.0.1" in error.message


# ---------------------------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0xa9fea9fe/",
        "http://127.0.0.2/",
        "http://evil.test/x.png",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "http://user:secret@127.0.0.1/",
    ],
)
def test_redirects_are_checked_like_the_first_url(server, connections, location):
    resolver = fake(evil_test="10.0.0.7")
    error = fails(server.url(f"/to?u={quote(location, safe='')}"), policy=LOCAL, resolve=resolver)
    assert (error.code, error.permanent) == ("url.refused", True)
    assert "redirected from" in error.message
    assert connections == [("127.0.0.1", server.port)]


@pytest.mark.parametrize(("path", "max_redirects"), [("/loop", 3), ("/chain/3", 2), ("/chain/1", 0)])
def test_too_many_redirects(server, path, max_redirects):
    error = fails(server.url(path), policy=LOCAL, max_redirects=max_redirects)
    assert (error.code, error.permanent) == ("url.too_many_redirects", True)


def test_exactly_max_redirects_are_followed(server):
    assert fetch_url(server.url("/chain/2"), max_bytes=MiB, timeout_s=5, policy=LOCAL, max_redirects=2) == PNG


def test_a_redirect_without_location_is_refused(server):
    error = fails(server.url("/nolocation"), policy=LOCAL)
    assert (error.code, error.permanent) == ("url.http_status", True)


# ---------------------------------------------------------------------------------------------- HTTP answers


@pytest.mark.parametrize(
    ("status", "code", "permanent"),
    [
        (404, "url.http_4xx", True),
        (403, "url.http_4xx", True),
        (410, "url.http_4xx", True),
        (429, "url.http_4xx", False),
        (500, "url.http_5xx", False),
        (503, "url.http_5xx", False),
        (304, "url.http_status", True),
    ],
)
def test_http_errors(server, status, code, permanent):
    error = fails(server.url(f"/status/{status}"), policy=LOCAL)
    assert (error.code, error.permanent) == (code, permanent)
    assert str(status) in error.message and error.to_dict()["code"] == code


# ---------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("/slow", {}),  # no answer at all
        ("/drip", {}),  # a byte every 50 ms: a per-recv timeout alone would never fire
        ("/slowchain/0", {"max_redirects": 10}),  # 0.15 s per hop: the budget spans the redirects
    ],
)
def test_the_time_budget_covers_the_whole_fetch(server, path, options):
    budget = 0.4
    started = time.monotonic()
    error = fails(server.url(path), policy=LOCAL, timeout_s=budget, **options)
    elapsed = time.monotonic() - started
    assert (error.code, error.permanent) == ("url.timeout", False)
    assert budget * 0.9 < elapsed < budget * 1.5


def test_the_time_budget_covers_a_hanging_lookup(connections):
    def hanging(*args, **kwargs):
        time.sleep(1.5)
        return [addrinfo("127.0.0.1", 80)]

    started = time.monotonic()
    error = fails("http://slow-dns.test/x.png", policy=LOCAL, resolve=hanging, timeout_s=0.3)
    assert (error.code, error.permanent) == ("url.timeout", False)
    assert time.monotonic() - started < 0.45
    assert connections == []


def test_a_declared_length_over_the_cap_is_refused_before_reading(server):
    started = time.monotonic()  # the server stalls after its headers: reading any body would take 2 s
    error = fails(server.url("/declared-large"), policy=LOCAL, max_bytes=MiB)
    assert (error.code, error.permanent) == ("url.too_large", True)
    assert "10,485,760" in error.message
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("path", ["/endless", "/unsized"])
def test_an_undeclared_body_over_the_cap_stops_the_download(server, path):
    started = time.monotonic()  # /endless streams for 3 s: only stopping early gets this done sooner
    error = fails(server.url(path), policy=LOCAL, max_bytes=len(PNG) - 1)
    assert (error.code, error.permanent) == ("url.too_large", True)
    assert time.monotonic() - started < 1


def test_a_content_length_shorter_than_the_body_bounds_what_is_read(server):
    assert fetch_url(server.url("/short-length"), max_bytes=100, timeout_s=5, policy=LOCAL) == b"\1" * 10


# ---------------------------------------------------------------------------------------------- failures


def test_a_body_cut_short_is_transient(server):
    error = fails(server.url("/cut-short"), policy=LOCAL)
    assert (error.code, error.permanent) == ("url.connection", False)


def test_a_hangup_before_answering_is_transient(server):
    error = fails(server.url("/hangup"), policy=LOCAL)
    assert (error.code, error.permanent) == ("url.connection", False)


def test_a_refused_connection_is_transient():
    with socket.socket() as unused:  # bound but not listening: connecting to it is refused
        unused.bind(("127.0.0.1", 0))
        error = fails(f"http://127.0.0.1:{unused.getsockname()[1]}/x.png", policy=LOCAL)
    assert (error.code, error.permanent) == ("url.connection", False)


@pytest.mark.parametrize(
    ("failure", "code", "permanent"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "url.unresolvable", True),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "url.connection", False),
        ([], "url.unresolvable", True),
    ],
)
def test_lookup_failures(failure, code, permanent, connections):
    def resolver(*args, **kwargs):
        if isinstance(failure, Exception):
            raise failure
        return failure

    error = fails("http://gone.test/x.png", resolve=resolver)
    assert (error.code, error.permanent) == (code, permanent)
    assert connections == []


# ---------------------------------------------------------------------------------------------- TLS


def test_https_verifies_the_certificate_for_the_name(tls_server, certificate, monkeypatch, connections):
    # The system's trust store does not know the test certificate: refused, permanently.
    error = fails(tls_server.url("/image", "img.test"), policy=LOCAL, resolve=fake(img_test="127.0.0.1"))
    assert (error.code, error.permanent) == ("url.tls", True)
    # Trusted, it is checked against the name in the URL although the connection goes to 127.0.0.1.
    monkeypatch.setattr(fetch, "_tls_context", lambda: ssl.create_default_context(cafile=certificate[0]))
    resolver = fake(img_test="127.0.0.1", other_test="127.0.0.1")
    assert (
        fetch_url(tls_server.url("/image", "img.test"), max_bytes=MiB, timeout_s=5, policy=LOCAL, resolve=resolver)
        == PNG
    )
    error = fails(tls_server.url("/image", "other.test"), policy=LOCAL, resolve=resolver)
    assert (error.code, error.permanent) == ("url.tls", True) and "other.test" in error.message
    assert {address for address, _ in connections} == {"127.0.0.1"}
