"""SSRF-safe fetching: the address policy as a pure function for every range and spelling,
and the fetcher's checks on loopback only (other destinations come from an injected
resolver and are refused before any connection)."""

from __future__ import annotations

import gzip
import ipaddress
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from pio_vllm.errors import ImageFetchError, ImageSourceError
from pio_vllm.intake.address_policy import (
    AddressPolicy,
    embedded_ipv4,
    parse_exception,
    refusal_reason,
)
from pio_vllm.intake.url_fetcher import UrlFetcher, resolve
from tests.helpers import encode, http_server, noise_image

REFUSED = {
    "127.0.0.1": "loopback", "127.255.0.9": "loopback", "::1": "loopback",
    "0.0.0.0": "unspecified", "::": "unspecified",
    "10.0.0.1": "private", "172.16.5.4": "private", "192.168.0.1": "private",
    "100.64.0.1": "not globally routable",
    "169.254.169.254": "link-local", "fe80::1": "link-local",
    "fd12:3456::1": "private", "fc00::1": "private",
    "224.0.0.251": "multicast", "ff02::1": "multicast",
    "240.0.0.1": "private", "255.255.255.255": "private", "192.0.2.7": "private",
    "198.18.0.1": "private", "2001:db8::1": "private",
    # IPv6 forms that carry an IPv4 address are judged by it
    "::ffff:127.0.0.1": "loopback", "::ffff:10.0.0.1": "private", "::127.0.0.1": "loopback",
    "2002:7f00:1::": "loopback", "64:ff9b::a00:1": "private",
    "::ffff:169.254.169.254": "link-local",
}
ALLOWED = ("8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "1.1.1.1")


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_non_public_addresses_are_refused(address: str) -> None:
    reason = refusal_reason(ipaddress.ip_address(address))
    assert reason is not None and REFUSED[address] in reason


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_embedded_ipv4_forms() -> None:
    assert embedded_ipv4(ipaddress.ip_address("::ffff:7f00:1")) == ipaddress.ip_address(
        "127.0.0.1")
    assert embedded_ipv4(ipaddress.ip_address("2002:a00:1::")) == ipaddress.ip_address(
        "10.0.0.1")
    assert embedded_ipv4(ipaddress.ip_address("2606:4700::1111")) is None
    assert embedded_ipv4(ipaddress.ip_address("::1")) is None  # loopback, not ::0.0.0.1


def test_exceptions_open_a_network_and_optionally_one_port() -> None:
    policy = AddressPolicy([parse_exception("10.0.0.0/8"),
                            parse_exception("127.0.0.1/32:8080"),
                            parse_exception("[fd00::]/8:9000")])
    ip = ipaddress.ip_address
    assert policy.check(ip("10.9.8.7"), 1234) is None
    assert policy.check(ip("127.0.0.1"), 8080) is None
    assert policy.check(ip("::ffff:127.0.0.1"), 8080) is None  # same address, mapped
    assert policy.check(ip("127.0.0.1"), 8081) == "loopback"
    assert policy.check(ip("127.0.0.2"), 8080) == "loopback"
    assert policy.check(ip("fd00::5"), 9000) is None
    assert policy.check(ip("fd00::5"), 9001) == "private"
    assert policy.check(ip("169.254.169.254"), 80) == "link-local"
    for bad in ("10.0.0.0/33", "localhost", "127.0.0.1:99999", "[::1/128", ""):
        with pytest.raises(ValueError, match="accepted: 'CIDR' or 'CIDR:PORT'|missing"):
            parse_exception(bad)


async def test_numeric_spellings_resolve_to_the_address_they_mean() -> None:
    """glibc resolves decimal, hex and short forms; the policy then sees 127.0.0.1."""
    loopback = ipaddress.ip_address("127.0.0.1")
    for spelling in ("2130706433", "0x7f000001", "127.1", "0177.0.0.1"):
        assert await resolve(spelling, 80) == [loopback], spelling


class Counter:
    """A loopback image server that counts the requests that reached it."""

    def __init__(self) -> None:
        self.hits = 0
        self._lock = threading.Lock()

    def route(self, body: bytes, headers: dict[str, str] | None = None,
              status: int = 200):  # type: ignore[no-untyped-def]
        def handle(h: BaseHTTPRequestHandler) -> None:
            with self._lock:
                self.hits += 1
            h.send_response(status)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        return handle


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_loopback_is_refused_in_every_spelling_without_a_connection() -> None:
    counter = Counter()
    png = encode(noise_image(8, 8, 1))
    with http_server({"/x.png": counter.route(png)}) as base:
        port = _port(base)
        fetcher = UrlFetcher(2.0, 10_000, None)  # default policy: public addresses only
        for url in (f"http://127.0.0.1:{port}/x.png", f"http://[::1]:{port}/x.png",
                    f"http://[::ffff:127.0.0.1]:{port}/x.png", f"http://0.0.0.0:{port}/x.png",
                    f"http://2130706433:{port}/x.png", f"http://0x7f000001:{port}/x.png",
                    f"http://127.1:{port}/x.png", f"http://localhost:{port}/x.png"):
            with pytest.raises(ImageSourceError, match="loopback|unspecified") as info:
                await fetcher.fetch(url)
            assert "images.allowed_private_networks" in str(info.value)
        with pytest.raises(ImageSourceError, match="credentials"):
            await fetcher.fetch(f"http://localhost@127.0.0.1:{port}/x.png")
        await fetcher.aclose()
    assert counter.hits == 0


async def test_dns_answers_are_checked_before_connecting() -> None:
    """A public-looking host that resolves to a private or metadata address is refused; the
    injected resolver stands in for DNS (no packet leaves the machine)."""
    answers = {"images.example.com": ["93.184.216.34", "10.0.0.5"],
               "metadata.example.com": ["169.254.169.254"],
               "rebind.example.com": ["::ffff:192.168.1.1"]}

    async def fake_resolve(host: str, port: int) -> list[ipaddress.IPv4Address
                                                         | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(a) for a in answers[host]]

    fetcher = UrlFetcher(2.0, 10_000, None, resolver=fake_resolve)
    for host, reason in (("images.example.com", "private"),
                         ("metadata.example.com", "link-local"),
                         ("rebind.example.com", "private")):
        with pytest.raises(ImageSourceError, match=reason):
            await fetcher.fetch(f"https://{host}/a.png")
    with pytest.raises(ImageFetchError, match="cannot resolve"):
        await UrlFetcher(2.0, 10_000, None).fetch("http://999.1.1.1/x.png")
    with pytest.raises(ImageSourceError, match="malformed"):
        await fetcher.fetch("http://[::1/x.png")
    with pytest.raises(ImageSourceError, match="unsupported URL scheme 'ftp'"):
        await fetcher.fetch("ftp://images.example.com/a.png")


async def test_redirect_hops_are_checked_again() -> None:
    counter = Counter()
    png = encode(noise_image(8, 8, 2))
    with http_server({"/target.png": counter.route(png)}) as target:
        target_port = _port(target)

        def redirect_to(location: str):  # type: ignore[no-untyped-def]
            return counter.route(b"", {"Location": location}, status=302)

        routes = {
            "/to-other-port": redirect_to(f"http://127.0.0.1:{target_port}/target.png"),
            "/to-localhost": redirect_to(f"http://localhost:{target_port}/target.png"),
            "/to-file": redirect_to("file:///etc/passwd"),
            "/ok.png": counter.route(png),
            "/relative": redirect_to("/ok.png"),
        }
        with http_server(routes) as base:
            port = _port(base)
            # only the first server's port is open
            fetcher = UrlFetcher(2.0, 10_000, None, AddressPolicy(
                [parse_exception(f"127.0.0.1/32:{port}")]))
            assert await fetcher.fetch(f"{base}/ok.png") == png
            assert await fetcher.fetch(f"{base}/relative") == png
            for path, match in (("/to-other-port", "loopback"), ("/to-localhost", "loopback"),
                                ("/to-file", "unsupported URL scheme 'file'")):
                with pytest.raises(ImageSourceError, match=match):
                    await fetcher.fetch(f"{base}{path}")
            await fetcher.aclose()
    assert counter.hits == 1 + 2 + 3  # ok, relative (two hops), three redirects; not the target


async def test_encoded_bodies_are_refused_and_content_never_quoted() -> None:
    secret = b"SECRET-INTERNAL-PAYLOAD" * 4
    counter = Counter()
    routes = {"/gz.png": counter.route(gzip.compress(b"\0" * 1_000_000),
                                       {"Content-Encoding": "gzip"}),
              "/text": counter.route(secret, {"Content-Type": "text/plain"})}
    with http_server(routes) as base:
        from pio_vllm.intake.image_loader import ImageLoader
        from pio_vllm.settings import ImageSettings

        loader = ImageLoader(ImageSettings(allowed_private_networks=[
            f"127.0.0.1/32:{_port(base)}"], max_image_bytes=100_000))
        with pytest.raises(ImageFetchError, match="gzip-encoded") as gz:
            await loader.load(f"{base}/gz.png")
        from pio_vllm.errors import ImageDecodeError

        with pytest.raises(ImageDecodeError) as text:
            await loader.load(f"{base}/text")
        await loader.aclose()
    for info in (gz, text):
        assert "SECRET" not in str(info.value)
