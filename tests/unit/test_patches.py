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


def test_priority_preemption_targets_exist() -> None:
    from pio_vllm_patches.batch_limit_scheduler import BatchLimitAsyncScheduler
    from pio_vllm_patches.priority_preemption import (
        PriorityPreemptionAsyncScheduler,
        PriorityPreemptionScheduler,
    )
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request, RequestStatus

    assert issubclass(PriorityPreemptionScheduler, Scheduler)
    assert issubclass(PriorityPreemptionAsyncScheduler, AsyncScheduler)
    assert issubclass(BatchLimitAsyncScheduler, AsyncScheduler)
    params = list(inspect.signature(Scheduler._preempt_request).parameters)
    assert params[:3] == ["self", "request", "timestamp"]
    preempt = inspect.getsource(Scheduler._preempt_request)
    assert "self.waiting.prepend_request(request)" in preempt  # back to vLLM's queue
    assert "request.num_preemptions += 1" in preempt
    assert "RequestStatus.PREEMPTED" in preempt
    init = inspect.getsource(Scheduler.__init__)
    assert "self.vllm_config = vllm_config" in init and "self.running" in init
    assert "additional_config" in VllmConfig.__dataclass_fields__
    assert {"WAITING", "PREEMPTED", "RUNNING"} <= set(RequestStatus.__members__)
    assert "priority" in inspect.signature(Request.__init__).parameters
    # vLLM's waiting queue under the priority policy iterates in (priority, arrival) order
    from vllm.v1.core.sched.request_queue import PriorityRequestQueue

    assert "heapq.heappop(heap_copy)" in inspect.getsource(PriorityRequestQueue.__iter__)


class _FakeRequest:
    def __init__(self, rid: str, priority: int, arrival: float, preemptions: int = 0,
                 status: str = "RUNNING") -> None:
        from vllm.v1.request import RequestStatus

        self.request_id = rid
        self.priority = priority
        self.arrival_time = arrival
        self.num_preemptions = preemptions
        self.status = RequestStatus[status]


class _FakeBase:
    """What PriorityPreemptionMixin reads of vLLM's Scheduler, without an engine."""

    def __init__(self, running: list[_FakeRequest], waiting: list[_FakeRequest], cap: int,
                 max_preemptions: int = 2) -> None:
        from types import SimpleNamespace

        from vllm.v1.core.sched.request_queue import SchedulingPolicy

        self.vllm_config = SimpleNamespace(additional_config={"pio": {
            "preemption": True, "max_preemptions": max_preemptions}})
        self.policy = SchedulingPolicy.PRIORITY
        self.running = running
        self.waiting = sorted(waiting, key=lambda r: (r.priority, r.arrival_time))
        self.max_num_active_reqs = cap
        self.preempted: list[str] = []

    def _preempt_request(self, request: _FakeRequest, timestamp: float) -> None:
        self.preempted.append(request.request_id)

    def schedule(self) -> list[str]:
        return self.preempted


def _scheduler(running: list[_FakeRequest], waiting: list[_FakeRequest], cap: int,
               **kw: int) -> object:
    from pio_vllm_patches.priority_preemption import PriorityPreemptionMixin

    class Sched(PriorityPreemptionMixin, _FakeBase):
        pass

    return Sched(running, waiting, cap, **kw)


def test_preemption_picks_lowest_priority_latest_arrival_and_respects_limits() -> None:
    running = [_FakeRequest("b-old", 2, 1.0), _FakeRequest("b-new", 2, 5.0),
               _FakeRequest("s", 1, 6.0), _FakeRequest("b-max", 2, 9.0, preemptions=2)]
    waiting = [_FakeRequest("i1", 0, 10.0, status="WAITING"),
               _FakeRequest("i2", 0, 11.0, status="WAITING"),
               _FakeRequest("grammar", 0, 9.5, status="WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR"),
               _FakeRequest("b-wait", 2, 12.0, status="WAITING")]
    sched = _scheduler(running, waiting, cap=4)
    assert sched.schedule() == ["b-new", "b-old"]  # type: ignore[attr-defined]
    # b-max is at its preemption limit; the blocked grammar request preempts nobody;
    # a waiting batch request never preempts its own class.
    assert [r.request_id for r in sched.running] == ["s", "b-max"]  # type: ignore[attr-defined]


def test_free_slots_are_used_before_preempting() -> None:
    running = [_FakeRequest("b", 2, 1.0)]
    waiting = [_FakeRequest("i1", 0, 2.0, status="WAITING"),
               _FakeRequest("i2", 0, 3.0, status="WAITING")]
    assert _scheduler(running, waiting, cap=2).schedule() == ["b"]  # type: ignore[attr-defined]
    assert _scheduler(list(running), waiting, cap=3).schedule() == []  # type: ignore[attr-defined]
    off = _scheduler(list(running), waiting, cap=1, max_preemptions=0)
    assert off.schedule() == []  # type: ignore[attr-defined]
