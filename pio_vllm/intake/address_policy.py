"""AddressPolicy: which network destinations an image fetch may connect to (pure code).

Deny by default: only globally routable unicast addresses are fetched. Refused, in every
spelling that resolves to them: loopback (127.0.0.0/8, ::1), private (10/8, 172.16/12,
192.168/16), shared (100.64/10), link-local (169.254/16, fe80::/10, cloud metadata services
live here), unique-local (fc00::/7), multicast, unspecified (0.0.0.0, ::), reserved and
documentation ranges, and the IPv6 forms that carry an IPv4 address (IPv4-mapped
::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, 6to4 2002::/16, Teredo 2001::/32, NAT64
64:ff9b::/96): those are judged by the IPv4 address inside. Explicit exceptions
(`images.allowed_private_networks`, e.g. an internal image store) may open a network, and
optionally one port of it.

Decisions take addresses the caller resolved itself (once, then connects to the same
address), never host names, so DNS cannot answer differently between check and connect.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pio_vllm.netspec import IPAddress, IPNetwork, NetworkException, parse_exception

__all__ = ["AddressPolicy", "IPAddress", "IPNetwork", "NetworkException", "embedded_ipv4",
           "parse_exception", "refusal_reason"]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    packed = int(address)
    if packed >> 32 == 0 and packed > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(packed)
    return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public unicast destination, or None if it is."""
    inner = embedded_ipv4(address)
    if inner is not None:
        reason = refusal_reason(inner)
        return None if reason is None else f"{reason} (inside IPv6 {address})"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("unique-local", isinstance(address, ipaddress.IPv6Address)
         and address in ipaddress.IPv6Network("fc00::/7")),
        ("not globally routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


class AddressPolicy:
    """Decides whether a fetch may connect to an (address, port)."""

    def __init__(self, exceptions: Iterable[NetworkException] = ()) -> None:
        self._exceptions = tuple(exceptions)

    def check(self, address: IPAddress, port: int) -> str | None:
        """None when allowed, else the reason it is refused."""
        reason = refusal_reason(address)
        if reason is None:
            return None
        candidates = [address]
        inner = embedded_ipv4(address)
        if inner is not None:
            candidates.append(inner)
        if any(e.covers(a, port) for e in self._exceptions for a in candidates):
            return None
        return reason
