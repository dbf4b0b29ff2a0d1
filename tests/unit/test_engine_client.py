"""PioEngineClient covers vLLM's whole EngineClient interface explicitly (no engine started)."""

from __future__ import annotations

import inspect

from vllm.engine.protocol import EngineClient

from pio_vllm.server.engine_client import PioEngineClient


def test_every_engine_client_method_is_defined_by_pio() -> None:
    """A method vLLM adds to EngineClient must be delegated or overridden on purpose:
    the base class's default would raise NotImplementedError or skip AsyncLLM's own."""
    public = {name for name, attr in vars(EngineClient).items()
              if not name.startswith("_") and (inspect.isfunction(attr)
                                               or isinstance(attr, property))}
    missing = sorted(n for n in public if n not in vars(PioEngineClient))
    assert not missing, f"EngineClient members not defined by PioEngineClient: {missing}"
    assert not getattr(PioEngineClient, "__abstractmethods__", frozenset())
