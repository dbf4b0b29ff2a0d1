"""Shared fixtures: settings of the tiny CPU config, the tiny checkpoint, one engine and one
`pio-vllm serve` process per session.

The tiny Qwen3-VL is built once into the default model cache (~/.cache/pio-vllm/models), the
same folder `pio-vllm demo` uses. The engine is real vLLM (CPU build) and is started once for
the whole test session; tests must leave it idle (see `assert_vllm_idle`). The server is
shared by the server test modules; the last of them (test_server_shutdown.py) stops it with
SIGTERM, and a later user would get a fresh one.

The first test that needs the engine or the server launches both, with the selected tests'
early jobs (the seed example, the benchmark smoke run), so that their start-ups share the two
cores; it waits for all of them before it runs (tests/early_start.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from pio_vllm.settings import PioSettings
from tests.early_start import EarlyStart
from tests.helpers import tiny_settings
from tests.server_helpers import (
    ImageHost,
    Server,
    launch_server,
    shared_server_config,
    wait_healthy,
)


def pytest_configure(config: pytest.Config) -> None:
    """Every engine this suite starts spawns two processes that import vLLM, torch and
    transformers. Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE=1, as on the
    development machines), each of those imports compiles ~3,000 modules from source, ~30 s
    a process. Keep compiled modules in a cache outside site-packages instead, for this
    process and the ones it starts (set before any test module imports vLLM); uv's
    reinstalls keep file times, so the cache stays valid."""
    cache = Path.home() / ".cache" / "pio-vllm" / "pycache"
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(cache))
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]
    sys.dont_write_bytecode = False


@pytest.fixture(scope="session")
def settings() -> PioSettings:
    return tiny_settings()


@pytest.fixture(scope="session")
def tiny_model_dir(settings: PioSettings) -> Path:
    """The tiny checkpoint (built on first use)."""
    from pio_vllm.engine.vllm_backend import resolve_model

    return Path(resolve_model(settings))


@pytest_asyncio.fixture(scope="session")
async def engine(settings: PioSettings, start_ups: StartUps):
    from pio_vllm.engine.pio_engine import PioEngine

    async with PioEngine(settings) as eng:
        await asyncio.to_thread(start_ups.settle)
        yield eng


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.close()


class _ServerSlot:
    """The shared server, restarted if a test stopped it."""

    def __init__(self, tmp: Path, image_host: ImageHost) -> None:
        self._tmp = tmp
        self._config = shared_server_config(tmp / "server.yaml", image_host.port)
        self._server: Server | None = None
        self._starts = 0
        self._failed: RuntimeError | None = None  # a start that failed is not retried
        self._healthy: Server | None = None  # the last server that answered /health

    def launch(self) -> None:
        if self._server is None or self._server.proc.poll() is not None:
            self._starts += 1
            self._server = launch_server(self._config, self._tmp / f"server{self._starts}.log")

    def get(self) -> Server:
        if self._failed is not None:
            raise self._failed
        self.launch()
        assert self._server is not None
        if self._healthy is not self._server:
            try:
                self._healthy = wait_healthy(self._server)
            except RuntimeError as e:
                self._failed = e
                raise
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


@pytest.fixture(scope="session")
def server_slot(tmp_path_factory: pytest.TempPathFactory,
                image_host: ImageHost) -> Iterator[_ServerSlot]:
    slot = _ServerSlot(tmp_path_factory.mktemp("server"), image_host)
    yield slot
    slot.stop()


@pytest.fixture(scope="session")
def early_start(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                tiny_model_dir: Path) -> Iterator[EarlyStart]:
    """Selected tests' early jobs (tests/early_start.py); the checkpoint is built first, so
    no two processes build it at once."""
    early = EarlyStart(request.session, tmp_path_factory.mktemp("early"))
    yield early
    early.settle()


@dataclass
class StartUps:
    early: EarlyStart
    server: _ServerSlot | None

    def settle(self) -> None:
        """Wait until every start-up launched with this one is done (the server healthy,
        each early job finished), so tests run on a quiet machine."""
        if self.server is not None:
            with contextlib.suppress(RuntimeError):  # the `server` fixture reports it
                self.server.get()
        self.early.settle()


@pytest.fixture(scope="session")
def start_ups(request: pytest.FixtureRequest, early_start: EarlyStart) -> StartUps:
    """The first need of the session engine or the shared server launches both of them (the
    server only if a selected test uses it) and every selected early job, side by side."""
    early_start.start_all()
    uses_server = any("server" in getattr(item, "fixturenames", ())
                      for item in request.session.items)
    slot = request.getfixturevalue("server_slot") if uses_server else None
    if slot is not None:
        slot.launch()
    return StartUps(early_start, slot)


@pytest.fixture
def server(server_slot: _ServerSlot, start_ups: StartUps) -> Server:
    """The shared `pio-vllm serve` process (see server_helpers.shared_server_config)."""
    start_ups.settle()
    return server_slot.get()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """The replica tests first: two engines and a router on two cores are timing-sensitive,
    so they run before the session engine and the shared server exist (module-scoped, they
    are gone before the next module starts)."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith(
        "tests/integration/test_replicas.py") else 1)
