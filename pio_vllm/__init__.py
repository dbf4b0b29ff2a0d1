"""pio-vllm: priority-aware orchestration for serving Qwen3-VL on vLLM.

`PioEngine` and the request types are importable from here; vLLM is imported only when the
engine is first used, so settings, errors and policies stay light to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pio_vllm.errors import PioError
from pio_vllm.request import PioOutput, PioRequest, RequestOutcome, RequestResult
from pio_vllm.settings import PioSettings

if TYPE_CHECKING:
    from pio_vllm.engine.pio_engine import PioEngine

__version__ = "0.1.0"
__all__ = ["PioEngine", "PioError", "PioOutput", "PioRequest", "PioSettings", "RequestOutcome",
           "RequestResult"]


def __getattr__(name: str) -> Any:
    if name == "PioEngine":
        from pio_vllm.engine.pio_engine import PioEngine

        return PioEngine
    raise AttributeError(f"module 'pio_vllm' has no attribute {name!r}")
