"""Fetch images over http(s) without server-side request forgery (frontend process, asyncio).

For every hop of a fetch (the URL and each redirect, at most MAX_REDIRECTS):

1. the URL must be http(s), carry no credentials, name a host in `allowed_url_domains` (when
   set) and a valid port;
2. the host is resolved once, here; every address it resolves to must pass the
   AddressPolicy (no loopback, private, link-local, ... unless explicitly allowed);
3. the connection goes to that checked address (the Host header and TLS server name stay
   the host's), so DNS cannot answer differently between the check and the connection;
4. redirects are followed by hand, each hop checked again.

Responses are read raw: pio asks for `Accept-Encoding: identity` and refuses an encoded
body, so a small compressed response cannot expand past the byte limit. The body is cut off
at `max_bytes` and the whole fetch runs under one deadline. Error messages name the URL and
the reason, never the response's content. Environment proxies are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from pio_vllm.errors import ImageFetchError, ImageSourceError, ImageTooLargeError
from pio_vllm.intake.address_policy import AddressPolicy, IPAddress

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)

# host, port -> resolved addresses (the resolver is injectable for tests)
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


def host_allowed(host: str, allowed_domains: list[str] | None) -> bool:
    """True if `host` is one of `allowed_domains` or a subdomain of one (None allows all)."""
    if allowed_domains is None:
        return True
    host = host.lower().rstrip(".")
    for domain in allowed_domains:
        domain = domain.lower().strip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False


_NUMERIC_PART = re.compile(r"0[xX][0-9a-fA-F]*|[0-9]+")


def is_numeric_host(host: str) -> bool:
    """True for IP literals in any spelling (127.0.0.1, 2130706433, 0x7f.1, ::1): they are
    parsed, never looked up in DNS."""
    return ":" in host or all(_NUMERIC_PART.fullmatch(p) for p in host.split("."))


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (numeric spellings such as 2130706433 included;
    those are parsed without a DNS query, so an invalid one like 999.1.1.1 fails here)."""
    flags = socket.AI_NUMERICHOST if is_numeric_host(host) else 0
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=flags)
    seen: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."


class UrlFetcher:
    """Fetches image bytes. Owns its http client; close with `aclose()`."""

    def __init__(self, timeout_s: float, max_bytes: int, allowed_domains: list[str] | None,
                 address_policy: AddressPolicy | None = None,
                 resolver: Resolver = resolve) -> None:
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._allowed_domains = allowed_domains
        self._policy = address_policy or AddressPolicy()
        self._resolve = resolver
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False,
                timeout=httpx.Timeout(self._timeout_s),
                headers={"Accept-Encoding": "identity"})
        return self._client

    async def fetch(self, url: str, index: int | None = None) -> bytes:
        """Return the body of `url`; raise a typed ImageError on any failure."""
        try:
            async with asyncio.timeout(self._timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    location = await self._hop(url, index)
                    if isinstance(location, bytes):
                        return location
                    url = location
                raise ImageFetchError(
                    f"fetching {_short(url)!r}: more than {MAX_REDIRECTS} redirects", index)
        except TimeoutError as e:
            raise ImageFetchError(
                f"fetching {_short(url)!r} took longer than fetch_timeout_s="
                f"{self._timeout_s}", index) from e
        except httpx.HTTPError as e:
            raise ImageFetchError(
                f"fetching {_short(url)!r} failed: {type(e).__name__}", index) from e

    def check_url(self, url: str, index: int | None = None) -> tuple[SplitResult, str, int]:
        """(parts, host, port) of an http(s) URL pio may fetch from; raises ImageSourceError
        naming what is wrong (scheme, credentials, host, port)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ImageSourceError(f"image URL {_short(url)!r} is malformed: {e}", index) from e
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageSourceError(
                f"unsupported URL scheme {parts.scheme!r} in {_short(url)!r}; accepted: "
                "http, https, data, file", index)
        if parts.username is not None or parts.password is not None:
            raise ImageSourceError(
                f"image URL {_short(url)!r} carries credentials (user@host); accepted: "
                "URLs without user information", index)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ImageSourceError(f"image URL {_short(url)!r} has no host", index)
        if not host_allowed(host, self._allowed_domains):
            raise ImageSourceError(
                f"host {host!r} is not in allowed_url_domains {self._allowed_domains}", index)
        return parts, host, port or (443 if scheme == "https" else 80)

    async def _address(self, host: str, port: int, url: str,
                       index: int | None) -> IPAddress:
        try:
            addresses = await self._resolve(host, port)
        except (OSError, UnicodeError, ValueError) as e:
            raise ImageFetchError(
                f"cannot resolve the host of {_short(url)!r}: {type(e).__name__}", index
            ) from e
        if not addresses:
            raise ImageFetchError(f"the host of {_short(url)!r} has no address", index)
        for address in addresses:
            reason = self._policy.check(address, port)
            if reason is not None:
                raise ImageSourceError(
                    f"image URL {_short(url)!r} resolves to {address}, a {reason} address; "
                    "accepted: public addresses (an operator may allow networks with "
                    "images.allowed_private_networks)", index)
        return addresses[0]

    async def _hop(self, url: str, index: int | None) -> bytes | str:
        """The body, or the next URL when the response is a redirect."""
        parts, host, port = self.check_url(url, index)
        address = await self._address(host, port, url, index)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        default_port = 443 if parts.scheme.lower() == "https" else 80
        headers = {"Host": host if port == default_port else f"{host}:{port}"}
        extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}
        request = self._get_client().build_request("GET", target, headers=headers,
                                                   extensions=extensions)
        response = await self._get_client().send(request, stream=True)
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise ImageFetchError(
                        f"fetching {_short(url)!r}: redirect without a Location", index)
                return urljoin(url, location)
            if response.status_code != 200:
                raise ImageFetchError(
                    f"fetching {_short(url)!r} returned HTTP {response.status_code}; "
                    "expected 200", index)
            encoding = response.headers.get("content-encoding", "identity").lower()
            if encoding not in ("", "identity"):
                raise ImageFetchError(
                    f"fetching {_short(url)!r}: the response is {encoding}-encoded although "
                    "pio asked for identity encoding; accepted: an unencoded body", index)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                raise ImageTooLargeError(
                    f"{_short(url)!r} is {int(declared)} bytes; max_image_bytes is "
                    f"{self._max_bytes}", index)
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_raw():
                total += len(chunk)
                if total > self._max_bytes:
                    raise ImageTooLargeError(
                        f"{_short(url)!r} exceeds max_image_bytes={self._max_bytes}", index)
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
