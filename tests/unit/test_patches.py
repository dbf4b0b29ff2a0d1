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


class _FakePosition:
    def __init__(self, offset: int, length: int) -> None:
        self.offset, self.length = offset, length


class _FakeFeature:
    def __init__(self, offset: int, length: int) -> None:
        self.mm_position = _FakePosition(offset, length)


class _BudgetRequest:
    """What StepBudgetMixin reads of a vLLM Request."""

    def __init__(self, rid: str, priority: int, num_tokens: int, computed: int,
                 images: tuple[tuple[int, int], ...] = (), status: str = "RUNNING") -> None:
        from vllm.v1.request import RequestStatus

        self.request_id, self.priority = rid, priority
        self.num_tokens, self.num_computed_tokens = num_tokens, computed
        self.mm_features = [_FakeFeature(offset, length) for offset, length in images]
        self.status = RequestStatus[status]

    def get_num_encoder_embeds(self, i: int) -> int:
        return int(self.mm_features[i].mm_position.length)


class _BudgetBase:
    """What StepBudgetMixin reads and sets of vLLM's Scheduler; `schedule` records what a
    step would have seen."""

    def __init__(self, running: list[_BudgetRequest], waiting: list[_BudgetRequest],
                 budget: dict[str, object] | None) -> None:
        from types import SimpleNamespace

        self.vllm_config = SimpleNamespace(additional_config={"pio": {
            "step_budget": budget}})
        self.running = running
        self.waiting = sorted(waiting, key=lambda r: r.priority)
        self.max_num_scheduled_tokens = 8192
        self.max_num_encoder_input_tokens = 8192
        self.max_num_active_reqs = 8
        self.seen: dict[str, object] = {}

    def schedule(self) -> dict[str, object]:
        self.seen = {"tokens": self.max_num_scheduled_tokens,
                     "encoder": self.max_num_encoder_input_tokens,
                     "cap": self.max_num_active_reqs,
                     "running": [r.request_id for r in self.running]}
        return self.seen


# 2B-on-CPU-like prices: 0.35 s a step, 4.5 ms a token, 12 ms a vision token; 2.5 s budget
BUDGET = {"budget_s": 2.5, "top_level": 0, "profile": [0.35, 0.0045, 0.012],
          "source": "test", "min_prefill_tokens": 16}


def _budgeted(running: list[_BudgetRequest], waiting: list[_BudgetRequest],
              budget: dict[str, object] | None = BUDGET) -> object:
    from pio_vllm_patches.step_budget import StepBudgetMixin

    class Sched(StepBudgetMixin, _BudgetBase):
        pass

    return Sched(running, waiting, budget)


def test_the_step_budget_caps_a_batch_step_and_restores_vllms_budgets() -> None:
    # four batch image prefills waiting (images of 64, 140, 300 and 300 vision tokens)
    waiting = [_BudgetRequest(f"b{i}", 2, 20 + v, 0, images=((10, v),), status="WAITING")
               for i, v in enumerate((64, 140, 300, 300))]
    sched = _budgeted([], waiting)
    seen = sched.schedule()  # type: ignore[attr-defined]
    # (2.5 - 0.35) / 0.0045 = 477 prefill tokens; (2.5 - 0.35) / 0.0165 = 130 vision tokens
    assert seen["tokens"] == 477 and seen["encoder"] == 130
    assert (sched.max_num_scheduled_tokens, sched.max_num_encoder_input_tokens) == (  # type: ignore[attr-defined]
        8192, 8192)
    assert sched.step_budget_stats()["budget_steps"] == 1  # type: ignore[attr-defined]


def test_an_image_too_large_for_the_budget_runs_alone() -> None:
    running = [_BudgetRequest(f"d{i}", 2, 100, 99) for i in range(4)]  # four decodes
    waiting = [_BudgetRequest("big", 2, 1400, 0, images=((10, 1344),), status="WAITING")]
    sched = _budgeted(running, waiting)
    seen = sched.schedule()  # type: ignore[attr-defined]
    assert seen["encoder"] == 1344 and seen["tokens"] == 4 + 1344
    assert sched.step_budget_stats()["alone_steps"] == 1  # type: ignore[attr-defined]


def test_top_class_work_alone_runs_with_full_budgets() -> None:
    waiting = [_BudgetRequest("i", 0, 400, 0, images=((10, 300),), status="WAITING")]
    assert _budgeted([], waiting).schedule()["tokens"] == 8192  # type: ignore[attr-defined]
    assert _budgeted([], waiting, budget=None).schedule()["tokens"] == 8192  # type: ignore[attr-defined]


def test_a_running_lower_prefill_sits_out_while_a_higher_request_waits() -> None:
    chunked = _BudgetRequest("batch-prefill", 2, 2000, 512, images=((10, 300),))
    decoding = _BudgetRequest("batch-decode", 2, 300, 299)
    urgent = _BudgetRequest("urgent", 0, 80, 0, images=((10, 64),), status="WAITING")
    sched = _budgeted([chunked, decoding], [urgent])
    seen = sched.schedule()  # type: ignore[attr-defined]
    assert seen["running"] == ["batch-decode"]  # the chunk waits for the next step
    assert seen["cap"] == 7  # ... and its slot is not given away
    assert [r.request_id for r in sched.running] == ["batch-decode", "batch-prefill"]  # type: ignore[attr-defined]
    assert sched.max_num_active_reqs == 8  # type: ignore[attr-defined]
    # the next image is the urgent request's: it fits the budget with the one decode
    assert seen["encoder"] == 130
    # without a higher request waiting, the chunk runs
    alone = _budgeted([chunked, decoding], [])
    assert alone.schedule()["running"] == ["batch-prefill", "batch-decode"]  # type: ignore[attr-defined]


def test_the_fitted_step_model_replaces_the_default_profile() -> None:
    waiting = [_BudgetRequest("b", 2, 2000, 0, status="WAITING"),
               _BudgetRequest("i", 1, 20, 0, status="WAITING")]
    sched = _budgeted([], waiting)
    sched.set_step_model(0.5, 0.001, 0.0, "fit")  # type: ignore[attr-defined]
    assert sched.schedule()["tokens"] == 2000  # type: ignore[attr-defined]  # (2.5 - 0.5) / 0.001
    assert sched.step_budget_stats()["profile"][3] == "fit"  # type: ignore[attr-defined]


def test_step_budget_targets_exist() -> None:
    from pio_vllm_patches.batch_limit_scheduler import BatchLimitScheduler
    from pio_vllm_patches.priority_preemption import PriorityPreemptionScheduler
    from pio_vllm_patches.step_budget import StepBudgetMixin
    from vllm.multimodal.inputs import PlaceholderRange
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert issubclass(BatchLimitScheduler, StepBudgetMixin)
    assert issubclass(PriorityPreemptionScheduler, StepBudgetMixin)
    assert {"offset", "length"} <= set(PlaceholderRange.__dataclass_fields__)
    for name in ("num_tokens", "num_computed_tokens", "mm_features"):
        assert hasattr(Request, name) or name in inspect.getsource(Request.__init__), name
    schedule = inspect.getsource(Scheduler.schedule)
    # the running loop walks self.running: a request taken out for a step is not scheduled
    assert "while req_index < len(self.running)" in schedule
    assert "len(self.running)" in schedule  # the running cap is checked against it
