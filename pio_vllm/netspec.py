"""Network exception specs: 'CIDR' or 'CIDR:PORT' (pure code, no pio import).

The settings validate `images.allowed_private_networks` with this parser, and the address
policy (`intake/address_policy.py`) decides with what it returns; it lives below both so
that the settings never import the intake layer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NetworkException:
    """One allowed non-global destination: a network, and optionally a single port."""

    network: IPNetwork
    port: int | None = None

    def covers(self, address: IPAddress, port: int) -> bool:
        return address in self.network and (self.port is None or self.port == port)


def parse_exception(spec: str) -> NetworkException:
    """'10.0.0.0/8', '127.0.0.1/32:8080', '[::1]/128:8080' or '[fd00::]/8'.

    Raises ValueError naming the spec and the accepted forms."""
    text = spec.strip()
    port: int | None = None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"network {spec!r}: missing ']'; accepted: '[fd00::]/8:PORT'")
        network_text = inner + (rest.split(":", 1)[0] if rest.startswith("/") else "")
        port_text = rest.split(":", 1)[1] if ":" in rest else None
    else:
        network_text, _, port_text_raw = text.partition(":")
        port_text = port_text_raw or None
    try:
        network = ipaddress.ip_network(network_text, strict=False)
        if port_text is not None:
            port = int(port_text)
            if not 0 < port < 65536:
                raise ValueError(port_text)
    except ValueError as e:
        raise ValueError(
            f"network {spec!r} is not valid ({e}); accepted: 'CIDR' or 'CIDR:PORT', e.g. "
            "'10.0.0.0/8', '127.0.0.1/32:8080', '[fd00::]/8:9000'") from None
    return NetworkException(network, port)
