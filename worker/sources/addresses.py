"""Which addresses a URL's host may resolve to before anything connects to it, and the error every refusal is.

The SSRF rules of `worker.sources.fetch` (image URLs) and of callbacks: the ranges refused and why, the IPv6
forms that carry an IPv4 address (judged as that address), and the operator's deliberate exceptions.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pipeline.core.errors import ItemError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Why each range is refused. The first match names the reason, so a narrower range comes before a wider one.
_BLOCKED_RANGES = {
    "0.0.0.0/8": "an unspecified ('this network') address",
    "10.0.0.0/8": "a private address",
    "100.64.0.0/10": "a carrier-grade NAT address",
    "127.0.0.0/8": "a loopback address",
    "169.254.0.0/16": "a link-local address",  # cloud metadata services live here
    "172.16.0.0/12": "a private address",
    "192.0.0.0/24": "an IETF protocol assignment",
    "192.0.2.0/24": "a documentation address",
    "192.88.99.0/24": "a 6to4 relay address",
    "192.168.0.0/16": "a private address",
    "198.18.0.0/15": "a benchmarking address",
    "198.51.100.0/24": "a documentation address",
    "203.0.113.0/24": "a documentation address",
    "224.0.0.0/4": "a multicast address",
    "255.255.255.255/32": "the broadcast address",
    "240.0.0.0/4": "a reserved address",
    "::/128": "the unspecified address",
    "::1/128": "a loopback address",
    "64:ff9b:1::/48": "a local-use NAT64 address",
    "100::/64": "a discard-only address",
    # Teredo hides the IPv4 addresses it carries behind an obfuscation; nothing legitimate serves images there.
    "2001::/32": "a Teredo tunnel address",
    "2001:2::/48": "a benchmarking address",
    "2001:db8::/32": "a documentation address",
    "3fff::/20": "a documentation address",
    "fc00::/7": "a private (unique local) address",
    "fe80::/10": "a link-local address",
    "fec0::/10": "a site-local address",
    "ff00::/8": "a multicast address",
}
_REASONS: dict[IPNetwork, str] = {ipaddress.ip_network(cidr): why for cidr, why in _BLOCKED_RANGES.items()}
DEFAULT_BLOCKED: tuple[IPNetwork, ...] = tuple(_REASONS)

# IPv6 ranges whose low 32 bits are an IPv4 address that the packet ends up at (mapped and 6to4 have properties).
_CARRYING_IPV4 = tuple(map(ipaddress.ip_network, ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")))


class FetchError(ItemError):
    """An image URL may not, or could not, be downloaded. `code` and `permanent` are set per case (see above)."""

    code = "url.invalid"

    def __init__(self, message: str, *, code: str, permanent: bool = True):
        super().__init__(message, code=code)
        self.permanent = permanent


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64, compatible, translated), where it carries one.

    Connecting to such an address reaches that IPv4 host, so it must be judged as that host.
    """
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _CARRYING_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a fetch may connect to: anything outside `blocked`, plus whatever `allowed` lets through.

    `allowed` holds deliberate exceptions (tests, an internal image store) and wins over `blocked`, but only for
    the address as resolved: an IPv6 address carrying an allowed IPv4 one (::ffff:127.0.0.1) is still judged by
    that IPv4 address against `blocked`, since such forms are how filters get dodged, not how exceptions are used.

    `allowed_hosts` names the hosts (`cdn.internal`, or `*.cdn.internal` for every subdomain) that may resolve to
    any address: one internal image server is let through without opening the network it sits in to every other
    name. It is judged by the name of each hop, so a redirect from an allowed host elsewhere is checked afresh.
    """

    blocked: tuple[IPNetwork, ...] = DEFAULT_BLOCKED
    allowed: tuple[IPNetwork, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # lowercase names, or *.name for the subdomains of name

    def check(self, address: IPAddress, *, host: str | None = None) -> None:
        """Raises `url.refused` unless `address` may be connected to; `host` is the name it came from."""
        if any(address in network for network in self.allowed):
            return
        if host is not None and self.host_allowed(host):
            return
        carried = embedded_ipv4(address)
        reason = self.refusal(address)
        if reason is None and carried is not None and (carried_reason := self.refusal(carried)) is not None:
            reason = f"an address carrying {carried}, {carried_reason}"
        if reason is not None:
            name = host or str(address)
            subject = f"{name} is" if name == str(address) else f"{name} resolves to {address},"
            raise FetchError(f"Refused: {subject} {reason}.", code="url.refused")

    def host_allowed(self, host: str) -> bool:
        """Whether `host` is on the allow-list: the very name, or a subdomain of a `*.` pattern's name."""
        name = host.lower().removesuffix(".")
        return any(
            name.endswith(pattern[1:]) if pattern.startswith("*.") else name == pattern
            for pattern in self.allowed_hosts
        )

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` is blocked (ignoring `allowed`), or None."""
        for network in self.blocked:
            if address in network:
                return f"{_REASONS.get(network, 'a blocked address')} ({network})"
        return None


DEFAULT_POLICY = AddressPolicy()


# One DNS label: letters, digits and inner hyphens, at most 63 characters.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def network_text(text: str) -> str:
    """A network as its users parse it again (`ipaddress.ip_network`, strict): host bits dropped, 10.1.2.3/16 is
    10.1.0.0/16; a single address is its own /32 or /128."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"{text!r} is not a network: write a CIDR such as 10.1.0.0/16, or one address") from None


def host_pattern(text: str) -> str:
    """A host name (`cdn.example.com`) or every subdomain of one (`*.example.com`), lowercased; never a URL."""
    host = text.strip().lower().removesuffix(".")
    name = host.removeprefix("*.")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(
            f"{text!r} is not a host name: write cdn.example.com, or *.example.com for its subdomains "
            "(no scheme, port, path or other wildcard)"
        )
    return host
