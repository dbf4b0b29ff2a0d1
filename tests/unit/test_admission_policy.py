"""Admission policy and controller with a fake clock and a fake engine (no vLLM)."""

from __future__ import annotations

import asyncio
import random

import pytest

from pio_vllm.admission.controller import AdmissionController, Release, Ticket, TicketState
from pio_vllm.admission.policy import (
    AdmissionPolicy,
    RateMeter,
    ShedReason,
    WaitingView,
    shed_decision,
)
from pio_vllm.errors import DeadlineExceededError, EngineNotRunningError, RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass

CLASSES = {
    "interactive": PriorityClass(level=0, max_queue_len=4, weight=4.0),
    "standard": PriorityClass(level=1, max_queue_len=4, weight=2.0),
    "batch": PriorityClass(level=2, max_queue_len=4, weight=1.0),
}
LEVEL = {name: c.level for name, c in CLASSES.items()}
IDLE = {"waiting": 0, "granted": 0, "class_queues": 0}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Takes granted tickets through preparing into 'vLLM' and finishes them on demand."""

    def __init__(self, ctl: AdmissionController) -> None:
        self.ctl = ctl
        self.shed: list[str] = []
        self.granted: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, rid: str, cls: str, deadline_at: float | None = None,
               slots: int = 1) -> Ticket:
        ticket = self.ctl.ticket(rid, LEVEL[cls], cls, deadline_at, slots)
        self.tasks[rid] = asyncio.create_task(self._admit(ticket))
        return ticket

    async def _admit(self, ticket: Ticket) -> None:
        try:
            await self.ctl.admit(ticket)
        except RequestRejectedError:
            self.shed.append(ticket.request_id)
            return
        self.granted.append(ticket.request_id)

    def start(self, ticket: Ticket) -> None:
        self.ctl.started(ticket)

    def finish(self, ticket: Ticket, outcome: Release = Release.COMPLETED) -> None:
        self.ctl.release(ticket, outcome)


def controller(capacity: int = 1, clock: FakeClock | None = None,
               bound_top_class: bool = True, **kw: object) -> AdmissionController:
    settings = AdmissionSettings(**kw)  # type: ignore[arg-type]
    return AdmissionController(settings, CLASSES, "standard", capacity,
                               clock=clock or FakeClock(), bound_top_class=bound_top_class)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_higher_class_is_granted_first_then_fifo() -> None:
    ctl = controller(capacity=1)
    eng = FakeEngine(ctl)
    first = eng.submit("r0", "interactive")
    await settle()
    eng.start(first)
    tickets = {rid: eng.submit(rid, cls) for rid, cls in
               [("b1", "batch"), ("s1", "standard"), ("s2", "standard")]}
    await settle()
    assert eng.granted == ["r0"]  # capacity 1 is taken by r0, which outranks them all
    eng.finish(first)
    for rid in ["s1", "s2", "b1"]:
        await settle()
        assert eng.granted[-1] == rid
        eng.start(tickets[rid])
        eng.finish(tickets[rid])
    assert ctl.held_state() == IDLE


async def test_lower_priority_work_never_holds_a_higher_class_back() -> None:
    """Capacity counts sequences of the same or higher priority only: an interactive request
    passes a full engine of batch work (vLLM's scheduler preempts one of them for it)."""
    ctl = controller(capacity=2)
    eng = FakeEngine(ctl)
    batch = [eng.submit(f"b{i}", "batch") for i in range(2)]
    await settle()
    for t in batch:
        eng.start(t)
    eng.submit("b-wait", "batch")
    hi = eng.submit("hi", "interactive")
    await settle()
    assert eng.granted == ["b0", "b1", "hi"]
    assert ctl.stats().queued == 1  # the third batch request waits
    eng.start(hi)
    eng.submit("hi2", "interactive")
    eng.submit("hi3", "interactive")  # interactive capacity (2) is now full
    await settle()
    assert eng.granted[-1] == "hi2" and "hi3" not in eng.granted
    eng.finish(hi)
    await settle()
    assert eng.granted[-1] == "hi3"


async def test_preparing_is_bounded_per_level() -> None:
    """At most max_preparing requests of a level or higher are rendered at once; an
    interactive one still gets a place while batch requests fill theirs."""
    ctl = controller(capacity=10, max_preparing=2)
    eng = FakeEngine(ctl)
    batch = [eng.submit(f"b{i}", "batch") for i in range(4)]
    await settle()
    assert eng.granted == ["b0", "b1"]
    eng.submit("hi", "interactive")
    await settle()
    assert eng.granted == ["b0", "b1", "hi"]
    eng.start(batch[0])  # b0 reached vLLM, but hi still counts against batch's places
    await settle()
    assert eng.granted[-1] == "hi"
    eng.start(batch[1])
    await settle()
    assert eng.granted[-1] == "b2"
    assert ctl.stats().preparing == 2 and ctl.stats().in_engine == 2


async def test_unbounded_top_class_prepares_a_burst_at_once() -> None:
    """bound_top_class=False (the server, where vLLM renders one request at a time): a burst
    of the top class is prepared at once; the level below still takes turns behind it.
    With the default, the top class takes turns like the others."""
    for bound, expected in ((False, 5), (True, 2)):
        ctl = controller(capacity=10, max_preparing=2, bound_top_class=bound)
        eng = FakeEngine(ctl)
        for i in range(5):
            eng.submit(f"hi{i}", "interactive")
        eng.submit("s0", "standard")
        await settle()
        assert eng.granted == [f"hi{i}" for i in range(expected)]
        assert ctl.stats().preparing == expected


async def test_n_counts_as_sequences() -> None:
    ctl = controller(capacity=4)
    eng = FakeEngine(ctl)
    a = eng.submit("n3", "standard", slots=3)
    await settle()
    eng.start(a)
    eng.submit("n2", "standard", slots=2)  # 3 + 2 > 4
    eng.submit("n1", "standard", slots=1)  # FIFO: waits behind n2
    await settle()
    assert eng.granted == ["n3"]
    eng.finish(a)
    await settle()
    assert eng.granted == ["n3", "n2", "n1"]
    big = controller(capacity=2)
    eng2 = FakeEngine(big)
    eng2.submit("n8", "standard", slots=8)  # larger than the capacity: runs alone
    await settle()
    assert eng2.granted == ["n8"]


def test_aging_lets_a_long_waiting_batch_request_overtake() -> None:
    policy = AdmissionPolicy(aging_s_per_level=10.0)
    old_batch = WaitingView(key=1, level=2, weight=1.0, arrival_at=0.0)
    fresh_interactive = WaitingView(key=2, level=0, weight=4.0, arrival_at=25.0)
    assert policy.order([fresh_interactive, old_batch], now=25.0)[0] is old_batch
    assert policy.order([fresh_interactive, old_batch], now=15.0)[0] is fresh_interactive


@pytest.mark.parametrize("aging_s", [10.0, 1e9], ids=["aging", "no-aging"])
async def test_aging_in_the_controller_with_a_fake_clock(aging_s: float) -> None:
    """When higher-class work fills the capacity, an aged batch request goes first when a
    place frees; without aging the fresh standard request takes it and batch waits on."""
    clock = FakeClock()
    ctl = controller(capacity=1, clock=clock, aging_s_per_level=aging_s)
    eng = FakeEngine(ctl)
    running = eng.submit("r0", "standard")
    await settle()
    eng.start(running)
    eng.submit("old-batch", "batch")
    await settle()
    clock.now += 30.0  # with aging: batch is 3 levels better, effective -1
    eng.submit("fresh-standard", "standard")
    await settle()
    eng.finish(running)
    await settle()
    if aging_s < 100:
        assert eng.granted[1:] == ["old-batch", "fresh-standard"]
    else:
        assert eng.granted[1:] == ["fresh-standard"]


async def test_full_class_queue_is_shed_with_retry_after() -> None:
    ctl = controller(capacity=1)
    eng = FakeEngine(ctl)
    eng.submit("run", "batch")
    await settle()
    for i in range(4):
        eng.submit(f"q{i}", "batch")
    await settle()
    with pytest.raises(RequestRejectedError, match="queue is full \\(4/4\\)") as info:
        await ctl.admit(ctl.ticket("q4", 2, "batch", None))
    assert info.value.reason == "queue_full" and info.value.retry_after_s > 0
    eng.submit("s", "standard")  # other classes have their own queues (and outrank batch)
    await settle()
    assert ctl.stats().classes["batch"].shed == 1 and ctl.stats().queued == 4
    assert eng.granted[-1] == "s"


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
    ctl = controller(capacity=1, clock=clock)
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
    loop = asyncio.get_running_loop()
    ctl = AdmissionController(AdmissionSettings(), CLASSES, "standard", 1, clock=loop.time)
    eng = FakeEngine(ctl)
    eng.submit("run", "standard")
    await settle()
    ticket = ctl.ticket("q", 1, "standard", loop.time() + 0.05)  # a real timer
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        await ctl.admit(ticket)
    assert ctl.stats().classes["standard"].expired == 1
    assert ctl.held_state()["waiting"] == 0


async def test_cancelling_a_queued_request_only_unqueues_it() -> None:
    ctl = controller(capacity=1)
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


async def test_kv_watermark_holds_back_all_but_requests_that_outrank() -> None:
    ctl = controller(capacity=4, kv_high_watermark=0.9)
    eng = FakeEngine(ctl)
    a = eng.submit("a", "standard")
    await settle()
    eng.start(a)
    ctl.update_engine(0.95, 1)
    eng.submit("b", "standard")
    eng.submit("c", "batch")
    await settle()
    assert eng.granted == ["a"]  # KV nearly full: b and c wait
    hi = eng.submit("hi", "interactive")
    await settle()
    assert eng.granted == ["a", "hi"]  # hi outranks a: vLLM frees a's KV for it
    eng.start(hi)
    ctl.update_engine(0.5, 1)
    await settle()
    assert eng.granted == ["a", "hi", "b", "c"]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ctl.set_capacity(0)


async def test_closing_fails_queued_requests_and_wait_idle_returns() -> None:
    ctl = controller(capacity=1)
    eng = FakeEngine(ctl)
    running = eng.submit("run", "standard")
    await settle()
    queued = ctl.ticket("q", 1, "standard", None)
    waiter = asyncio.create_task(ctl.admit(queued))
    await settle()
    idle = asyncio.create_task(ctl.wait_idle())
    await settle()
    assert not idle.done()
    ctl.close()
    with pytest.raises(EngineNotRunningError, match="shut down while the request was queued"):
        await waiter
    with pytest.raises(EngineNotRunningError):
        await ctl.admit(ctl.ticket("late", 1, "standard", None))
    assert not idle.done()  # `run` still holds its place
    eng.finish(running)
    await asyncio.wait_for(idle, 1)
    assert ctl.held_state() == IDLE


async def test_random_traffic_leaves_no_state() -> None:
    clock = FakeClock()
    ctl = controller(capacity=3, clock=clock, max_preparing=2)
    eng = FakeEngine(ctl)
    rng = random.Random(7)
    live: list[Ticket] = []
    classes = list(CLASSES)
    for i in range(2000):
        action = rng.random()
        clock.now += rng.random() * 0.1
        granted = [t for t in live if t.state in (TicketState.PREPARING, TicketState.IN_ENGINE)]
        if action < 0.45:
            live.append(eng.submit(f"r{i}", rng.choice(classes), slots=rng.choice([1, 1, 2])))
        elif action < 0.6:
            preparing = [t for t in granted if t.state is TicketState.PREPARING]
            if preparing:
                eng.start(rng.choice(preparing))
        elif action < 0.85:
            if granted:
                t = rng.choice(granted)
                eng.finish(t, rng.choice(list(Release)))
                live.remove(t)
        else:
            queued = [rid for rid, task in eng.tasks.items() if not task.done()]
            if queued:
                eng.tasks[rng.choice(queued)].cancel()
        await settle()
        stats = ctl.stats()
        # invariants: per-level capacity and preparing bounds hold at every step
        assert stats.preparing <= 2 * len(CLASSES)
    for _ in range(100):
        await settle()
        for t in [t for t in live
                  if t.state in (TicketState.PREPARING, TicketState.IN_ENGINE)]:
            eng.finish(t)
            live.remove(t)
        if all(task.done() for task in eng.tasks.values()):
            break
    await settle()
    assert ctl.held_state() == IDLE
    stats = ctl.stats().classes
    assert sum(c.shed for c in stats.values()) == len(eng.shed) > 0
    assert sum(c.admitted for c in stats.values()) == len(eng.granted)


def test_prometheus_collectors_carry_per_class_numbers() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pio_vllm.admission.metrics import Event

    registry = CollectorRegistry()
    ctl = AdmissionController(AdmissionSettings(), CLASSES, "standard", 1, registry=registry)
    ctl.metrics.count("batch", Event.SHED)
    ctl.metrics.observe_ttft("interactive", 0.02)
    text = generate_latest(registry).decode()
    assert 'pio_admission_events_total{event="shed",priority_class="batch"} 1.0' in text
    assert 'pio_time_to_first_token_seconds_count{priority_class="interactive"} 1.0' in text
    with pytest.raises(KeyError):  # only configured classes: a bounded label set
        ctl.metrics.count("level7", Event.SHED)


async def test_requests_that_free_capacity_will_take_are_not_a_queue() -> None:
    """Preparing is bounded, so a burst waits briefly even with capacity free: those
    requests are not counted against the class queue limit (no early 429s)."""
    ctl = controller(capacity=6, max_preparing=2)  # batch max_queue_len is 4
    eng = FakeEngine(ctl)
    for i in range(11):
        eng.submit(f"b{i}", "batch")
    await settle()
    assert eng.shed == ["b10"]  # 6 fit the capacity, 4 queue, the 11th is shed
    assert len(eng.granted) == 2 and ctl.stats().queued == 8
