"""Shared fixtures: settings of the tiny CPU config, the tiny checkpoint, one engine per session.

The tiny Qwen3-VL is built once into the default model cache (~/.cache/pio-vllm/models), the
same folder `pio-vllm demo` uses. The engine is real vLLM (CPU build) and is started once for
the whole test session; tests must leave it idle (see `assert_vllm_idle`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from pio_vllm.settings import PioSettings
from tests.helpers import tiny_settings


@pytest.fixture(scope="session")
def settings() -> PioSettings:
    return tiny_settings()


@pytest.fixture(scope="session")
def tiny_model_dir(settings: PioSettings) -> Path:
    """The tiny checkpoint (built on first use)."""
    from pio_vllm.engine.vllm_backend import resolve_model

    return Path(resolve_model(settings))


@pytest_asyncio.fixture(scope="session")
async def engine(settings: PioSettings, tiny_model_dir: Path):
    from pio_vllm.engine.pio_engine import PioEngine

    async with PioEngine(settings) as eng:
        yield eng
