"""pio's changes to vLLM's behaviour, one module per change (index: README.md).

Imported as `pio_vllm_patches` (pyproject maps the package to this folder). Nothing changes
at import time: vLLM loads `register` through the `vllm.general_plugins` entry point in
every process it starts (the EngineCore included), and `register` installs the patches
that must live there. Each patch's `install()` returns its undo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

_undo: list[Callable[[], None]] = []


def register() -> None:
    """vLLM general plugin: install pio's engine-core patches once per process."""
    if _undo:
        return
    from pio_vllm_patches import engine_core_batch_limits

    _undo.append(engine_core_batch_limits.install())
    logger.debug("pio patches installed: engine_core_batch_limits")


def unregister() -> None:
    while _undo:
        _undo.pop()()
