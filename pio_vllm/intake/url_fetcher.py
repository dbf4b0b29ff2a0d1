"""Fetch images over http(s) with byte, time and host limits (frontend process, asyncio).

One shared `httpx.AsyncClient`; every hop of a redirect chain is checked against the allowed
hosts, the body is read in chunks and cut off at the byte limit, and the whole fetch runs
under one deadline.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import httpx

from pio_vllm.errors import ImageFetchError, ImageSourceError, ImageTooLargeError

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 3


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


class UrlFetcher:
    """Fetches image bytes. Owns its http client; close with `aclose()`."""

    def __init__(
        self, timeout_s: float, max_bytes: int, allowed_domains: list[str] | None
    ) -> None:
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._allowed_domains = allowed_domains
        self._client: httpx.AsyncClient | None = None

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                timeout=httpx.Timeout(self._timeout_s),
                event_hooks={"request": [self._check_hop]},
            )
        return self._client

    async def _check_hop(self, request: httpx.Request) -> None:
        if request.url.scheme not in ("http", "https"):
            raise ImageSourceError(
                f"redirect to unsupported scheme {request.url.scheme!r}; accepted: http, https"
            )
        if not host_allowed(request.url.host, self._allowed_domains):
            raise ImageSourceError(
                f"host {request.url.host!r} is not in allowed_url_domains "
                f"{self._allowed_domains}"
            )

    async def fetch(self, url: str, index: int | None = None) -> bytes:
        """Return the body of `url`; raise a typed ImageError on any failure."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageSourceError(
                f"unsupported URL scheme {parts.scheme!r} in {url[:80]!r}; accepted: "
                "http, https, data, file",
                index,
            )
        if not host_allowed(parts.hostname or "", self._allowed_domains):
            raise ImageSourceError(
                f"host {parts.hostname!r} is not in allowed_url_domains {self._allowed_domains}",
                index,
            )
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._read(url, index)
        except TimeoutError as e:
            raise ImageFetchError(
                f"fetching {url[:120]!r} took longer than fetch_timeout_s={self._timeout_s}",
                index,
            ) from e
        except ImageSourceError as e:
            raise type(e)(str(e), index) from e
        except httpx.HTTPError as e:
            raise ImageFetchError(f"fetching {url[:120]!r} failed: {e!r}", index) from e

    async def _read(self, url: str, index: int | None) -> bytes:
        async with self._get_client().stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageFetchError(
                    f"fetching {url[:120]!r} returned HTTP {response.status_code}; expected 200",
                    index,
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                raise ImageTooLargeError(
                    f"{url[:120]!r} is {int(declared)} bytes; max_image_bytes is "
                    f"{self._max_bytes}",
                    index,
                )
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > self._max_bytes:
                    raise ImageTooLargeError(
                        f"{url[:120]!r} exceeds max_image_bytes={self._max_bytes}", index
                    )
                chunks.append(chunk)
            return b"".join(chunks)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
