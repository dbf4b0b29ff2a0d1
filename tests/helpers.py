"""Test helpers: images in every format, crafted bad images, a local HTTP server, idle checks."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from pio_vllm.settings import PioSettings

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"

# Engines the tests start take the tiny model's whole context (its max_position_embeddings),
# so that a request meant to stay in flight until the test ends it can ask for FILL_TOKENS:
# its length is bounded by the model, not tuned to this machine's decode speed (3000-4000
# tokens took 5-7 s here, and fills of that length ended inside tests on faster runs).
TEST_MAX_MODEL_LEN = 32768
FILL_TOKENS = 32000


def tiny_settings(**overrides: object) -> PioSettings:
    """Settings of configs/tiny-cpu.yaml with test-friendly limits (1.5 s URL fetches), the
    model's whole context (`TEST_MAX_MODEL_LEN`) and fetches from loopback allowed (the
    tests' image servers; nothing else is reachable)."""
    base = PioSettings.load(TINY_CONFIG)
    images = base.images.model_copy(update={"fetch_timeout_s": 1.5,
                                            "allowed_private_networks": ["127.0.0.1/32"]})
    engine = {**base.engine, "max_model_len": TEST_MAX_MODEL_LEN}
    return base.model_copy(update={"images": images, "engine": engine, **overrides})


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    shape = (height, width) if channels == 1 else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims `width` x `height` (a decompression bomb header)."""
    data = encode(noise_image(8, 8, 0))
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


Route = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def http_server(routes: dict[str, Route]) -> Iterator[str]:
    """Serve `routes` (path -> handler) on 127.0.0.1; yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            route(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def serve_bytes(body: bytes, content_type: str = "image/png") -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return route


def serve_slow(delay_s: float) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay_s)
        with suppress(OSError):
            serve_bytes(b"late")(h)

    return route


class HeldImage:
    """An image route whose fetches wait until `release()`: a request fetching it holds its
    admission place (admitted, being prepared) for as long as the test wants, whatever the
    machine's speed. `wait_fetches(n)` waits until n fetches have arrived. A fetch still
    held after `guard_s` is answered anyway, so nothing outlives a failed test."""

    def __init__(self, body: bytes, guard_s: float = 300.0) -> None:
        self._body = body
        self._guard_s = guard_s
        self._fetches = 0
        self._arrived = threading.Condition()
        self._released = threading.Event()

    @property
    def fetches(self) -> int:
        with self._arrived:
            return self._fetches

    def route(self, h: BaseHTTPRequestHandler) -> None:
        with self._arrived:
            self._fetches += 1
            self._arrived.notify_all()
        self._released.wait(self._guard_s)
        with suppress(OSError):  # the fetching process may be gone (a killed replica)
            serve_bytes(self._body)(h)

    def wait_fetches(self, n: int, timeout_s: float = 120.0) -> None:
        """Wait until `n` fetches have arrived (the bound only turns a hang into a failure)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._fetches >= n, timeout_s):
                raise AssertionError(f"{self._fetches} of {n} image fetches arrived within "
                                     f"{timeout_s:.0f}s")

    def release(self) -> None:
        self._released.set()


def serve_redirect(location: str) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.end_headers()

    return route


async def assert_vllm_idle(engine, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    """Fail unless vLLM's frontend and EngineCore both hold zero requests within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        backend = engine.backend
        core = backend.probe.snapshot()
        frontend = backend.num_unfinished()
        if frontend == 0 and core.num_running == 0 and core.num_waiting == 0:
            assert engine.stats().active_requests == 0
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"vLLM not idle after {timeout_s}s: frontend unfinished={frontend}, "
                f"engine running={core.num_running} waiting={core.num_waiting}"
            )
        await asyncio.sleep(0.05)
