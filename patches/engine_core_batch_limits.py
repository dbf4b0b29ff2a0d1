"""engine_core_batch_limits: an EngineCore utility method to reach BatchLimitScheduler.

Process: EngineCore (installed by the `vllm.general_plugins` entry point, which vLLM runs in
every process it starts; also harmless in the frontend and workers).
Target: `vllm.v1.engine.core.EngineCore.pio_batch_limits` (a new attribute; nothing of vLLM
is replaced). vLLM versions verified: 0.32.0, 0.23.0.

What it changes: adds one method. vLLM's frontend reaches EngineCore methods by name through
utility calls (`engine_core.call_utility_async(name, *args)`; EngineCore dispatches with
`getattr(self, name)`); the scheduler is not reachable that way, so this method forwards
to it: it sets the next limits and returns the current ones and the step samples recorded
since the previous call, in one round trip.

Why: pio's BatchTuner runs in the frontend (it needs the request mix); the limits act in
the scheduler, between steps. `collective_rpc` only reaches workers.

How to remove: delete the entry point in pyproject.toml; pio then runs with static limits
(`tuning.enabled: false`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METHOD = "pio_batch_limits"


def pio_batch_limits(self: Any, max_active: int | None = None, max_tokens: int | None = None,
                     token_floor: int | None = None, max_encoder_tokens: int | None = None
                     ) -> dict[str, Any]:
    scheduler = getattr(self, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "set_batch_limits"):
        raise RuntimeError(
            f"EngineCore scheduler is {type(scheduler).__name__}; pio's batch limits need "
            "scheduler_cls=pio_vllm_patches.batch_limit_scheduler.BatchLimitScheduler")
    limits: dict[str, Any] = scheduler.set_batch_limits(
        max_active, max_tokens, token_floor, max_encoder_tokens)
    limits["samples"] = scheduler.take_samples()
    return limits


def install() -> Callable[[], None]:
    """Add `EngineCore.pio_batch_limits`; returns the undo."""
    from vllm.v1.engine.core import EngineCore

    previous = EngineCore.__dict__.get(METHOD)
    EngineCore.pio_batch_limits = pio_batch_limits  # type: ignore[attr-defined]

    def undo() -> None:
        if previous is None:
            delattr(EngineCore, METHOD)
        else:
            setattr(EngineCore, METHOD, previous)

    return undo
