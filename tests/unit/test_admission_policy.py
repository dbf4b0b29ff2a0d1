"""Admission policy and controller with a fake clock and a fake engine (no vLLM)."""

from __future__ import annotations

import asyncio
import random

import pytest

from pio_vllm.admission.controller import AdmissionController, Release, Ticket, TicketState
from pio_vllm.admission.policy import (
    AdmissionPolicy,
    RateMeter,
    RunningView,
    ShedReason,
    WaitingView,
    shed_decision,
)
from pio_vllm.errors import DeadlineExceededError, RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass

CLASSES = {
    "interactive": PriorityClass(level=0, max_queue_len=4, weight=4.0),
    "standard": PriorityClass(level=1, max_queue_len=4, weight=2.0),
    "batch": PriorityClass(level=2, max_queue_len=4, weight=1.0),
}
LEVEL = {name: c.level for name, c in CLASSES.items()}
IDLE = {"waiting": 0, "admitted": 0, "preempting": 0, "reserved": 0, "class_queues": 0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Runs admitted tickets until told to finish; honours preemption like PioEngine does."""

    def __init__(self, ctl: AdmissionController) -> None:
        self.ctl = ctl
        self.preempted: list[str] = []
        self.shed: list[str] = []
        self.admit_order: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, rid: str, cls: str, deadline_at: float | None = None,
               tokens: int = 0) -> Ticket:
        ticket = self.ctl.ticket(rid, LEVEL[cls], cls, deadline_at)
        ticket.output_tokens = tokens

        def hook(t: Ticket = ticket) -> None:
            self.preempted.append(t.request_id)
            # the engine aborts in vLLM, sees the abort, gives the slot back and requeues
            asyncio.get_running_loop().call_soon(self._requeue, t)

        ticket.preempt_hook = hook
        self.tasks[rid] = asyncio.create_task(self._admit(ticket))
        return ticket

    async def _admit(self, ticket: Ticket) -> None:
        try:
            await self.ctl.admit(ticket)
        except RequestRejectedError:
            self.shed.append(ticket.request_id)
            return
        self.admit_order.append(ticket.request_id)

    def _requeue(self, ticket: Ticket) -> None:
        self.ctl.release(ticket, Release.PREEMPTED)
        self.tasks[ticket.request_id + "#r"] = asyncio.create_task(
            self.ctl.admit(ticket, requeue=True))

    def finish(self, ticket: Ticket) -> None:
        self.ctl.release(ticket, Release.COMPLETED)


def controller(window: int = 1, clock: FakeClock | None = None, **kw: object
               ) -> AdmissionController:
    settings = AdmissionSettings(**kw)  # type: ignore[arg-type]
    return AdmissionController(settings, CLASSES, "standard", window,
                               clock=clock or FakeClock())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_higher_class_is_admitted_first_then_fifo() -> None:
    ctl = controller(window=1, preemption=False)
    eng = FakeEngine(ctl)
    first = eng.submit("r0", "batch")
    await settle()
    tickets = {rid: eng.submit(rid, cls) for rid, cls in
               [("b1", "batch"), ("s1", "standard"), ("i1", "interactive"), ("s2", "standard")]}
    await settle()
    assert eng.admit_order == ["r0"]
    eng.finish(first)
    for rid in ["i1", "s1", "s2", "b1"]:
        await settle()
        assert eng.admit_order[-1] == rid
        eng.finish(tickets[rid])
    assert ctl.held_state() == IDLE


def test_aging_lets_a_long_waiting_batch_request_overtake() -> None:
    policy = AdmissionPolicy(aging_s_per_level=10.0)
    old_batch = WaitingView(key=1, level=2, weight=1.0, arrival_at=0.0)
    fresh_interactive = WaitingView(key=2, level=0, weight=4.0, arrival_at=25.0)
    assert policy.order([fresh_interactive, old_batch], now=25.0)[0] is old_batch
    assert policy.order([fresh_interactive, old_batch], now=15.0)[0] is fresh_interactive


async def test_aging_in_the_controller_with_a_fake_clock() -> None:
    clock = FakeClock()
    ctl = controller(window=1, clock=clock, preemption=False, aging_s_per_level=10.0)
    eng = FakeEngine(ctl)
    running = eng.submit("r0", "standard")
    await settle()
    old = eng.submit("old-batch", "batch")
    await settle()
    clock.now += 30.0  # batch aged by 3 levels: effective -1
    eng.submit("fresh-interactive", "interactive")
    await settle()
    eng.finish(running)
    await settle()
    assert eng.admit_order[-1] == "old-batch"
    eng.finish(old)
    await settle()
    assert eng.admit_order[-1] == "fresh-interactive"


async def test_full_class_queue_is_shed_with_retry_after() -> None:
    ctl = controller(window=1, preemption=False)
    eng = FakeEngine(ctl)
    eng.submit("run", "batch")
    await settle()
    for i in range(4):
        eng.submit(f"q{i}", "batch")
    await settle()
    with pytest.raises(RequestRejectedError, match="queue is full \\(4/4\\)") as info:
        await ctl.admit(ctl.ticket("q4", 2, "batch", None))
    assert info.value.reason == "queue_full" and info.value.retry_after_s > 0
    # other classes have their own queues
    eng.submit("s", "standard")
    await settle()
    assert ctl.stats().classes["batch"].shed == 1 and ctl.stats().queued == 5


def test_deadline_feasibility_uses_the_measured_rate() -> None:
    meter = RateMeter(window=16, min_samples=4)
    assert meter.rate(0.0) is None
    for t in range(10):
        meter.record(float(t))  # one completion per second
    rate = meter.rate(9.0)
    assert rate == pytest.approx(1.0)
    decision = shed_decision(queue_len=5, max_queue_len=100, ahead=5, free_slots=0,
                             rate_per_s=rate, deadline_in_s=2.0)
    assert decision is not None and decision[0] is ShedReason.DEADLINE_INFEASIBLE
    assert decision[1] == pytest.approx(4.0)  # 6 s expected wait - 2 s deadline
    assert shed_decision(queue_len=5, max_queue_len=100, ahead=5, free_slots=0,
                         rate_per_s=rate, deadline_in_s=10.0) is None
    # no measurement yet: never shed on a guess
    assert shed_decision(queue_len=5, max_queue_len=100, ahead=5, free_slots=0,
                         rate_per_s=None, deadline_in_s=0.5) is None


async def test_infeasible_deadline_is_refused_in_the_controller() -> None:
    clock = FakeClock()
    ctl = controller(window=1, clock=clock, preemption=False)
    eng = FakeEngine(ctl)
    for i in range(10):  # measure 2 completions per second
        t = eng.submit(f"w{i}", "standard")
        await settle()
        clock.now += 0.5
        eng.finish(t)
    eng.submit("run", "standard")
    for i in range(3):
        eng.submit(f"q{i}", "standard")
    await settle()
    with pytest.raises(RequestRejectedError, match="deadline cannot be met") as info:
        await ctl.admit(ctl.ticket("late", 1, "standard", clock.now + 0.5))
    assert info.value.reason == "deadline_infeasible"


async def test_deadline_passing_in_the_queue_expires_the_request() -> None:
    ctl = AdmissionController(AdmissionSettings(preemption=False), CLASSES, "standard", 1)
    eng = FakeEngine(ctl)
    eng.submit("run", "standard")
    await settle()
    loop = asyncio.get_running_loop()
    ticket = ctl.ticket("q", 1, "standard", None)
    ticket.queue_deadline_at = loop.time() + 0.05  # monotonic, as the controller's clock
    ctl._clock = loop.time  # real time for a real timer
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        await ctl.admit(ticket)
    assert ctl.stats().classes["standard"].expired == 1
    assert ctl.held_state()["waiting"] == 0


async def test_cancelling_a_queued_request_only_unqueues_it() -> None:
    ctl = controller(window=1, preemption=False)
    eng = FakeEngine(ctl)
    running = eng.submit("run", "standard")
    await settle()
    eng.submit("q", "standard")
    await settle()
    eng.tasks["q"].cancel()
    await settle()
    assert ctl.stats().queued == 0 and ctl.stats().classes["standard"].cancelled == 1
    eng.finish(running)
    assert ctl.held_state() == IDLE


def test_victim_is_lowest_class_then_least_progressed() -> None:
    policy = AdmissionPolicy(max_preemptions=2)
    running = [
        RunningView(key=1, level=2, output_tokens=50, preemptions=0, admitted_at=0.0),
        RunningView(key=2, level=2, output_tokens=5, preemptions=0, admitted_at=1.0),
        RunningView(key=3, level=1, output_tokens=1, preemptions=0, admitted_at=2.0),
        RunningView(key=4, level=2, output_tokens=1, preemptions=2, admitted_at=3.0),
    ]
    assert policy.choose_victim(running, waiting_level=0, excluded=set()).key == 2  # type: ignore[union-attr]
    assert policy.choose_victim(running, waiting_level=0, excluded={2}).key == 1  # type: ignore[union-attr]
    assert policy.choose_victim(running, waiting_level=1, excluded={1, 2}) is None
    assert policy.choose_victim(running, waiting_level=2, excluded=set()) is None  # same class


async def test_waiting_high_class_preempts_and_victim_resumes() -> None:
    ctl = controller(window=2)
    eng = FakeEngine(ctl)
    a = eng.submit("batch-a", "batch", tokens=40)
    b = eng.submit("batch-b", "batch", tokens=3)
    await settle()
    hi = eng.submit("hi", "interactive")
    await settle()
    assert eng.preempted == ["batch-b"]
    assert eng.admit_order[-1] == "hi"
    assert b.preemptions == 1 and b.state is TicketState.QUEUED
    assert ctl.stats().classes["batch"].preempted == 1
    eng.finish(hi)
    await settle()
    assert b.state is TicketState.ADMITTED  # resumed in hi's slot
    eng.finish(a)
    eng.finish(b)
    assert ctl.held_state()["admitted"] == 0


async def test_preemption_limit_and_switch() -> None:
    ctl = controller(window=1, max_preemptions=1)
    eng = FakeEngine(ctl)
    low = eng.submit("low", "batch")
    await settle()
    h1 = eng.submit("h1", "interactive")
    await settle()
    assert eng.preempted == ["low"]
    eng.finish(h1)
    await settle()
    eng.submit("h2", "interactive")
    await settle()
    assert eng.preempted == ["low"]  # at its limit: not preempted again
    assert low.state is TicketState.ADMITTED
    off = controller(window=1, preemption=False)
    eng2 = FakeEngine(off)
    eng2.submit("low", "batch")
    await settle()
    eng2.submit("hi", "interactive")
    await settle()
    assert eng2.preempted == []


async def test_kv_watermark_and_window_gate_admission() -> None:
    ctl = controller(window=1, preemption=False, kv_high_watermark=0.9)
    eng = FakeEngine(ctl)
    eng.submit("a", "standard")
    await settle()
    eng.submit("b", "standard")
    await settle()
    ctl.set_window(2)
    ctl.update_kv_usage(0.95)
    eng.submit("c", "standard")
    await settle()
    assert eng.admit_order == ["a", "b"]  # window 2 admitted b; KV full holds c back
    ctl.set_window(3)
    await settle()
    assert eng.admit_order == ["a", "b"]
    ctl.update_kv_usage(0.5)
    await settle()
    assert eng.admit_order == ["a", "b", "c"]
    with pytest.raises(ValueError, match="window must be >= 1"):
        ctl.set_window(0)


async def test_random_traffic_leaves_no_state() -> None:
    clock = FakeClock()
    ctl = controller(window=3, clock=clock, max_preemptions=2)
    eng = FakeEngine(ctl)
    rng = random.Random(7)
    live: list[Ticket] = []
    classes = list(CLASSES)
    for i in range(2000):
        action = rng.random()
        clock.now += rng.random() * 0.1
        if action < 0.5:
            live.append(eng.submit(f"r{i}", rng.choice(classes), tokens=rng.randint(0, 9)))
        elif action < 0.8:
            admitted = [t for t in live if t.state is TicketState.ADMITTED]
            if admitted:
                t = rng.choice(admitted)
                eng.finish(t)
                live.remove(t)
        else:
            queued = [rid for rid, task in eng.tasks.items() if not task.done()]
            if queued:
                eng.tasks[rng.choice(queued)].cancel()
        await settle()
    while live:
        await settle()
        for t in [t for t in live if t.state is TicketState.ADMITTED]:
            eng.finish(t)
            live.remove(t)
        live = [t for t in live if t.state is not TicketState.DONE]
        if all(task.done() for task in eng.tasks.values()) and not any(
                t.state is TicketState.ADMITTED for t in live):
            break
    await settle()
    for task in eng.tasks.values():
        if not task.done():
            task.cancel()
    await settle()
    assert ctl.held_state() == IDLE
    stats = ctl.stats().classes
    assert sum(c.preempted for c in stats.values()) > 0
    assert sum(c.shed for c in stats.values()) == len(eng.shed) > 0


def test_prometheus_collectors_carry_per_class_numbers() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    ctl = AdmissionController(AdmissionSettings(), CLASSES, "standard", 1, registry=registry)
    ctl.metrics.count("batch", __import__("pio_vllm.admission.metrics",
                                          fromlist=["Event"]).Event.SHED)
    ctl.metrics.observe_ttft("interactive", 0.02)
    text = generate_latest(registry).decode()
    assert 'pio_admission_events_total{event="shed",priority_class="batch"} 1.0' in text
    assert 'pio_time_to_first_token_seconds_count{priority_class="interactive"} 1.0' in text


async def test_reservations_fill_free_slots_then_count_as_queue() -> None:
    """The server reserves places before it renders a request: reservations that free
    slots will take are not queued; beyond them the class queue limit applies."""
    ctl = controller(window=2, preemption=False)
    tickets = [ctl.ticket(f"r{i}", LEVEL["batch"], "batch", None) for i in range(7)]
    for t in tickets[:6]:  # 2 slots + a queue of 4
        ctl.reserve(t)
    with pytest.raises(RequestRejectedError, match="queue is full"):
        ctl.reserve(tickets[6])
    assert ctl.held_state()["reserved"] == 6
    ctl.cancel_reservation(tickets[5])
    ctl.cancel_reservation(tickets[5])  # idempotent
    ctl.reserve(ctl.ticket("again", LEVEL["batch"], "batch", None))  # the freed place
    # admit() takes a reservation over without a second shed check
    await asyncio.wait_for(ctl.admit(tickets[0]), 1)
    assert tickets[0].state is TicketState.ADMITTED
    assert ctl.held_state()["reserved"] == 5
    ctl.release(tickets[0], Release.COMPLETED)
    ctl.close()  # frees the remaining reservations
    assert ctl.held_state() == {"waiting": 0, "admitted": 0, "preempting": 0, "reserved": 0,
                                "class_queues": 0}
