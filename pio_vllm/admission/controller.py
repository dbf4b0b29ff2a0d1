"""AdmissionController: pio's priority queue in front of all per-request work (frontend process,
asyncio).

A request waits here before anything is done for it: before the server renders its chat
template or loads its images, before pio decodes them. A ticket moves

    QUEUED --grant--> PREPARING --started--> IN_ENGINE --release--> DONE

QUEUED tickets wait in priority order with aging (see `policy.py`). A ticket of level L is
granted when

- the requests past the queue (preparing or in vLLM) of level <= L occupy fewer than
  `capacity` sequences: vLLM's max_num_seqs plus a small lookahead that waits, prepared, in
  vLLM's own priority-ordered queue, so a finished request's slot is refilled inside the
  engine, not after a frontend round trip. Lower-priority requests do not count against a
  higher-priority one: it enters vLLM anyway, and pio's scheduler in the EngineCore
  (patches/priority_preemption.py) preempts a lower-priority running request for it;
- fewer than `max_preparing` requests of level <= L are being prepared (bounded
  preprocessing: a flood's images are rendered a few at a time, and an urgent request is
  never behind more than that);
- vLLM's KV cache usage is under the high watermark, unless the ticket outranks something
  already in vLLM (vLLM frees KV by preempting the lowest priority first).

New requests are refused at once (RequestRejectedError with retry-after) when their class
queue is full or their deadline cannot be met at the measured service rate; a deadline that
passes while queued raises DeadlineExceededError; cancelling a queued request only removes it
from the queue. The controller never imports vLLM: it takes numbers (capacity, KV usage), so
tests drive it with a fake engine and a fake clock.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pio_vllm.admission.metrics import AdmissionMetrics, ClassStats, Event
from pio_vllm.admission.policy import AdmissionPolicy, RateMeter, WaitingView, shed_decision
from pio_vllm.errors import DeadlineExceededError, EngineNotRunningError, RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass

logger = logging.getLogger(__name__)


class TicketState(enum.Enum):
    NEW = "new"
    QUEUED = "queued"  # waiting in pio's queue; nothing has been done for it yet
    PREPARING = "preparing"  # granted: being rendered / its images loaded
    IN_ENGINE = "in_engine"  # submitted to vLLM (running or in vLLM's waiting queue)
    DONE = "done"


class Release(enum.Enum):
    """How a granted request ended (one per request)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # its deadline passed after it was granted


_RELEASE_EVENT = {Release.COMPLETED: Event.COMPLETED, Release.FAILED: Event.FAILED,
                  Release.CANCELLED: Event.CANCELLED, Release.EXPIRED: Event.EXPIRED}


@dataclass(eq=False)
class Ticket:
    """One request's place in admission. Priority follows vLLM: a lower level goes first."""

    key: int
    request_id: str
    class_name: str
    level: int
    weight: float
    arrival_at: float
    queue_deadline_at: float | None  # monotonic; request deadline or class max_queue_wait_s
    slots: int = 1  # sequences it occupies in vLLM (n > 1 fans out into n requests)
    state: TicketState = TicketState.NEW
    granted_at: float | None = None
    _future: asyncio.Future[None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AdmissionStats:
    """Snapshot of the controller."""

    capacity: int
    max_preparing: int
    queued: int
    preparing: int
    in_engine: int
    kv_cache_usage: float
    service_rate_per_s: float | None
    classes: dict[str, ClassStats]


class AdmissionController:
    """Bounded per-class queues, aging and shedding in front of intake and vLLM."""

    def __init__(
        self,
        settings: AdmissionSettings,
        classes: dict[str, PriorityClass],
        default_class: str,
        capacity: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        registry: Any | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self._settings = settings
        self._classes = classes
        self._default_class = default_class
        self._policy = AdmissionPolicy(aging_s_per_level=settings.aging_s_per_level)
        self._capacity = capacity
        self._max_preparing = settings.max_preparing
        self._clock = clock
        self._keys = itertools.count()
        self._waiting: dict[int, Ticket] = {}
        self._queued_per_class: dict[str, int] = {}
        self._granted: dict[int, Ticket] = {}  # PREPARING or IN_ENGINE
        self._kv_usage = 0.0
        self._rate = RateMeter(window=settings.rate_window)
        self.metrics = AdmissionMetrics(list(classes), registry)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # -- tickets ------------------------------------------------------------------------

    def ticket(self, request_id: str, level: int, class_name: str, deadline_at: float | None,
               slots: int = 1) -> Ticket:
        """A ticket for a new request of a configured class. `deadline_at` is monotonic
        (None: no deadline); `slots` is the number of sequences it will run (n)."""
        cls = self._classes[class_name]
        now = self._clock()
        deadline = deadline_at
        if cls.max_queue_wait_s is not None:
            wait_deadline = now + cls.max_queue_wait_s
            deadline = wait_deadline if deadline is None else min(deadline, wait_deadline)
        return Ticket(key=next(self._keys), request_id=request_id, class_name=class_name,
                      level=level, weight=cls.weight, arrival_at=now,
                      queue_deadline_at=deadline, slots=max(1, slots))

    # -- the request's path -------------------------------------------------------------

    async def admit(self, ticket: Ticket) -> None:
        """Wait in the queue until `ticket` may be prepared and sent to vLLM.

        Raises RequestRejectedError at once when shed, DeadlineExceededError if its queue
        deadline passes first, EngineNotRunningError when the controller closes.
        Cancellation removes it from the queue.
        """
        self._check_open()
        now = self._clock()
        self._shed_check(ticket, now)
        ticket.state = TicketState.QUEUED
        ticket._future = asyncio.get_running_loop().create_future()
        self._waiting[ticket.key] = ticket
        self._idle.clear()
        self._queued_per_class[ticket.class_name] = (
            self._queued_per_class.get(ticket.class_name, 0) + 1)
        self.metrics.add_queued(ticket.class_name, 1)
        self._pump()
        if ticket.state is TicketState.PREPARING:
            return
        deadline = ticket.queue_deadline_at
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        future = ticket._future
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if ticket.state is TicketState.PREPARING:  # granted as the timer fired
                return
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            self.metrics.count(ticket.class_name, Event.EXPIRED)
            raise DeadlineExceededError(
                f"request {ticket.request_id} ({ticket.class_name}) waited "
                f"{self._clock() - ticket.arrival_at:.2f}s in pio's queue and its deadline "
                "passed before vLLM had room"
            ) from None
        except asyncio.CancelledError:
            if ticket.state is TicketState.PREPARING:
                self.release(ticket, Release.CANCELLED)
            elif ticket.state is TicketState.QUEUED:
                self._unqueue(ticket)
                ticket.state = TicketState.DONE
                self.metrics.count(ticket.class_name, Event.CANCELLED)
            raise

    def started(self, ticket: Ticket) -> None:
        """The granted request was handed to vLLM: its preparing place frees."""
        if ticket.state is not TicketState.PREPARING:
            return
        ticket.state = TicketState.IN_ENGINE
        self.metrics.add_preparing(ticket.class_name, -1)
        self._pump()

    def release(self, ticket: Ticket, outcome: Release) -> None:
        """A granted request ended (idempotent): its place frees."""
        if self._granted.pop(ticket.key, None) is None:
            return
        if ticket.state is TicketState.PREPARING:
            self.metrics.add_preparing(ticket.class_name, -1)
        ticket.state = TicketState.DONE
        self.metrics.add_running(ticket.class_name, -1)
        self.metrics.count(ticket.class_name, _RELEASE_EVENT[outcome])
        if outcome is Release.COMPLETED:
            self._rate.record(self._clock())
        self._pump()
        self._check_idle()

    def observe_ttft(self, ticket: Ticket, ttft_s: float) -> None:
        self.metrics.observe_ttft(ticket.class_name, ttft_s)

    def observe_preemptions(self, ticket: Ticket, preemptions: int) -> None:
        """The request was preempted `preemptions` times inside vLLM."""
        if preemptions > 0:
            self.metrics.count(ticket.class_name, Event.PREEMPTED, preemptions)

    # -- engine feedback ----------------------------------------------------------------

    def set_capacity(self, capacity: int) -> None:
        """Change how many sequences may be past the queue at once (>= 1)."""
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._pump()

    @property
    def capacity(self) -> int:
        return self._capacity

    def update_kv_usage(self, usage: float) -> None:
        """vLLM's KV cache usage (0..1) from its latest scheduler stats."""
        self._kv_usage = usage
        self._pump()

    # -- core ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineNotRunningError("admission is closed: the engine is shutting down")

    def _past_queue(self, level: int) -> tuple[int, int]:
        """(sequences past the queue, requests preparing) of level <= `level`."""
        slots = preparing = 0
        for t in self._granted.values():
            if t.level <= level:
                slots += t.slots
                preparing += t.state is TicketState.PREPARING
        return slots, preparing

    def _may_grant(self, ticket: Ticket) -> bool:
        slots, preparing = self._past_queue(ticket.level)
        if preparing >= self._max_preparing:
            return False
        if slots and slots + ticket.slots > self._capacity:
            return False
        if self._kv_usage < self._settings.kv_high_watermark:
            return True
        # KV is nearly full: only a request that outranks something in vLLM goes in
        # (vLLM's priority policy frees KV from the lowest priority first).
        return any(t.level > ticket.level for t in self._granted.values())

    def _view(self, t: Ticket) -> WaitingView:
        return WaitingView(key=t.key, level=t.level, weight=t.weight, arrival_at=t.arrival_at)

    def _pump(self) -> None:
        if not self._waiting:
            return
        now = self._clock()
        blocked_level: int | None = None  # FIFO: nothing of this level or lower passes
        for view in self._policy.order((self._view(t) for t in self._waiting.values()), now):
            ticket = self._waiting[view.key]
            if blocked_level is not None and ticket.level >= blocked_level:
                continue
            if self._may_grant(ticket):
                self._grant(ticket, now)
            else:
                blocked_level = ticket.level if blocked_level is None else min(
                    blocked_level, ticket.level)

    def _grant(self, ticket: Ticket, now: float) -> None:
        self._unqueue(ticket)
        ticket.state = TicketState.PREPARING
        ticket.granted_at = now
        self._granted[ticket.key] = ticket
        self.metrics.add_running(ticket.class_name, 1)
        self.metrics.add_preparing(ticket.class_name, 1)
        self.metrics.count(ticket.class_name, Event.ADMITTED)
        self.metrics.observe_queue_wait(ticket.class_name, now - ticket.arrival_at)
        if ticket._future is not None and not ticket._future.done():
            ticket._future.set_result(None)

    def _shed_check(self, ticket: Ticket, now: float) -> None:
        limits = self._classes[ticket.class_name]
        ahead = sum(
            t.slots for t in self._waiting.values()
            if self._policy.effective_level(self._view(t), now) <= ticket.level)
        slots, _ = self._past_queue(ticket.level)
        free = max(0, self._capacity - slots)
        # Waiting requests that free capacity will take at once (other classes' first,
        # conservatively; the preparing bound only spaces them out) are not a queue.
        in_class = self._queued_per_class.get(ticket.class_name, 0)
        others = sum(t.slots for t in self._waiting.values()
                     if t.level <= ticket.level and t.class_name != ticket.class_name)
        queue_len = max(0, in_class - max(0, free - others))
        rate = self._rate.rate(now)
        decision = shed_decision(
            queue_len=queue_len, max_queue_len=limits.max_queue_len, ahead=ahead,
            free_slots=free, rate_per_s=rate,
            deadline_in_s=None if ticket.queue_deadline_at is None
            else ticket.queue_deadline_at - now,
        )
        if decision is None:
            return
        reason, retry_after_s = decision
        ticket.state = TicketState.DONE
        self.metrics.count(ticket.class_name, Event.SHED)
        detail = (
            f"class {ticket.class_name!r} queue is full ({queue_len}/{limits.max_queue_len})"
            if reason.value == "queue_full"
            else f"its deadline cannot be met: {ahead} requests are ahead at "
            f"{rate or 0:.2f} completions/s"
        )
        raise RequestRejectedError(
            f"request {ticket.request_id} shed: {detail}; retry after {retry_after_s:.1f}s",
            retry_after_s=retry_after_s,
            reason=reason.value,
        )

    def _unqueue(self, ticket: Ticket) -> None:
        if self._waiting.pop(ticket.key, None) is None:
            return
        self._queued_per_class[ticket.class_name] -= 1
        if not self._queued_per_class[ticket.class_name]:
            del self._queued_per_class[ticket.class_name]
        self.metrics.add_queued(ticket.class_name, -1)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._waiting and not self._granted:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is queued, being prepared or in vLLM."""
        await self._idle.wait()

    # -- inspection ---------------------------------------------------------------------

    def stats(self) -> AdmissionStats:
        preparing = sum(t.state is TicketState.PREPARING for t in self._granted.values())
        return AdmissionStats(
            capacity=self._capacity,
            max_preparing=self._max_preparing,
            queued=len(self._waiting),
            preparing=preparing,
            in_engine=len(self._granted) - preparing,
            kv_cache_usage=self._kv_usage,
            service_rate_per_s=self._rate.rate(self._clock()),
            classes=self.metrics.snapshot(),
        )

    def held_state(self) -> dict[str, int]:
        """Per-request state still held (all zero when idle: the leak check)."""
        return {"waiting": len(self._waiting), "granted": len(self._granted),
                "class_queues": sum(self._queued_per_class.values())}

    def close(self) -> None:
        """Refuse new tickets and fail the queued ones."""
        self._closed = True
        for ticket in list(self._waiting.values()):
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            if ticket._future is not None and not ticket._future.done():
                ticket._future.set_exception(
                    EngineNotRunningError("the engine shut down while the request was queued"))
                ticket._future.exception()
