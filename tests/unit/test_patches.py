"""Drift tests for patches/: each target exists with the shape the patch relies on in the
pinned vLLM, and install/undo round-trips (no engine is started)."""

from __future__ import annotations

import importlib.metadata
import inspect

import pio_vllm_patches
from pio_vllm_patches import engine_core_batch_limits
from pio_vllm_patches.batch_limit_scheduler import BatchLimitScheduler


def test_scheduler_targets_exist() -> None:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert issubclass(BatchLimitScheduler, Scheduler)
    init = inspect.getsource(Scheduler.__init__)
    schedule = inspect.getsource(Scheduler.schedule)
    for attr in ("max_num_scheduled_tokens", "max_num_active_reqs"):
        assert f"self.{attr} =" in init, attr  # set at start ...
        assert f"self.{attr}" in schedule, attr  # ... and read by every schedule()
    assert "token_budget = self.max_num_scheduled_tokens" in schedule
    assert "self.max_num_encoder_input_tokens =" in init
    assert "encoder_compute_budget = self.max_num_encoder_input_tokens" in schedule
    assert list(inspect.signature(Scheduler.update_from_output).parameters)[:3] == [
        "self", "scheduler_output", "model_runner_output"]
    fields = SchedulerOutput.__dataclass_fields__
    for name in ("total_num_scheduled_tokens", "scheduled_encoder_inputs",
                 "num_scheduled_tokens"):
        assert name in fields, name
    assert "input_id" in inspect.signature(Request.get_num_encoder_embeds).parameters


def test_engine_core_utility_dispatch_reaches_methods_by_name() -> None:
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    # The process class dispatches utility calls by name; it inherits our method.
    assert issubclass(EngineCoreProc, EngineCore)
    handler = inspect.getsource(EngineCoreProc._handle_client_request)
    assert "getattr(self, method_name)" in handler
    assert "self.scheduler" in inspect.getsource(EngineCore.__init__)


def test_engine_core_patch_install_undo_round_trips() -> None:
    from vllm.v1.engine.core import EngineCore

    had = hasattr(EngineCore, engine_core_batch_limits.METHOD)
    pio_vllm_patches.unregister()
    assert not hasattr(EngineCore, engine_core_batch_limits.METHOD)
    undo = engine_core_batch_limits.install()
    assert EngineCore.pio_batch_limits is engine_core_batch_limits.pio_batch_limits  # type: ignore[attr-defined]
    undo()
    assert not hasattr(EngineCore, engine_core_batch_limits.METHOD)
    pio_vllm_patches.register()
    assert hasattr(EngineCore, engine_core_batch_limits.METHOD)
    pio_vllm_patches.register()  # idempotent
    if not had:
        pio_vllm_patches.unregister()


def test_plugin_entry_point_is_registered() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "pio_vllm_patches:register" for ep in eps)
