"""AdmissionController: pio's priority queue in front of vLLM (frontend process, asyncio).

Requests wait here, not in vLLM, until the engine has room: fewer than `window` requests
admitted and KV cache usage (from vLLM's per-step scheduler stats) under the high watermark.
They are released in priority order with aging (see `policy.py`). When a higher-class request
waits and the window is full, the controller asks the engine to preempt the lowest-class,
least-progressed running request (`Ticket.preempt_hook`); the engine aborts it in vLLM and
brings it back with `admit(ticket, requeue=True)` to resume from its tokens so far.

New requests are refused at once (RequestRejectedError with retry-after) when their class
queue is full or their deadline cannot be met at the measured service rate; a deadline that
passes while queued raises DeadlineExceededError; cancelling a queued request only removes it
from the queue. The controller never imports vLLM: it takes numbers (window, KV usage) and
calls hooks, so tests drive it with a fake engine and a fake clock.
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
from pio_vllm.admission.policy import (
    AdmissionPolicy,
    RateMeter,
    RunningView,
    WaitingView,
    estimated_wait_s,
    shed_decision,
)
from pio_vllm.errors import DeadlineExceededError, EngineNotRunningError, RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass

logger = logging.getLogger(__name__)


class TicketState(enum.Enum):
    NEW = "new"
    RESERVED = "reserved"  # passed the shed check, holds a queue place, not yet waiting
    QUEUED = "queued"
    ADMITTED = "admitted"
    DONE = "done"


class Release(enum.Enum):
    """Why an admitted request gave its slot back."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"


@dataclass(eq=False)
class Ticket:
    """One request's place in admission. The engine updates `output_tokens` as tokens come."""

    key: int
    request_id: str
    class_name: str
    level: int
    weight: float
    arrival_at: float
    queue_deadline_at: float | None  # monotonic; request deadline or class max_queue_wait_s
    request_deadline_at: float | None  # the request's own deadline (for requeued tickets)
    state: TicketState = TicketState.NEW
    output_tokens: int = 0
    preemptions: int = 0
    preempt_requested: bool = False
    admitted_at: float | None = None
    first_admitted_at: float | None = None
    preempt_hook: Callable[[], None] | None = None
    _future: asyncio.Future[None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AdmissionStats:
    """Snapshot of the controller."""

    window: int
    admitted: int
    queued: int
    preempting: int
    kv_cache_usage: float
    service_rate_per_s: float | None
    classes: dict[str, ClassStats]


class AdmissionController:
    """Bounded per-class queues, aging, shedding and preemption in front of vLLM."""

    def __init__(
        self,
        settings: AdmissionSettings,
        classes: dict[str, PriorityClass],
        default_class: str,
        window: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        registry: Any | None = None,
    ) -> None:
        self._settings = settings
        self._classes = classes
        self._default_class = default_class
        self._policy = AdmissionPolicy(
            aging_s_per_level=settings.aging_s_per_level,
            max_preemptions=settings.max_preemptions if settings.preemption else 0,
        )
        self._window = window
        self._clock = clock
        self._keys = itertools.count()
        self._waiting: dict[int, Ticket] = {}
        self._queued_per_class: dict[str, int] = {}
        self._reserved: dict[int, Ticket] = {}
        self._admitted: dict[int, Ticket] = {}
        self._preempting: set[int] = set()
        self._kv_usage = 0.0
        self._rate = RateMeter(window=settings.rate_window)
        self.metrics = AdmissionMetrics(list(classes), registry)
        self._closed = False

    # -- tickets ------------------------------------------------------------------------

    def ticket(
        self, request_id: str, level: int, class_name: str | None, deadline_at: float | None
    ) -> Ticket:
        """A ticket for a new request. `deadline_at` is monotonic (None: no deadline)."""
        now = self._clock()
        cls = self._classes.get(class_name or "")
        if cls is None:  # a bare level that names no class: default class limits
            cls = self._classes[self._default_class]
            name = class_name or f"level{level}"
        else:
            name = class_name or self._default_class
        deadline = deadline_at
        if cls.max_queue_wait_s is not None:
            wait_deadline = now + cls.max_queue_wait_s
            deadline = wait_deadline if deadline is None else min(deadline, wait_deadline)
        return Ticket(
            key=next(self._keys), request_id=request_id, class_name=name, level=level,
            weight=cls.weight, arrival_at=now, queue_deadline_at=deadline,
            request_deadline_at=deadline_at,
        )

    def _limits(self, ticket: Ticket) -> PriorityClass:
        return self._classes.get(ticket.class_name) or self._classes[self._default_class]

    # -- admission ----------------------------------------------------------------------

    def reserve(self, ticket: Ticket) -> None:
        """Decide now whether `ticket` would be shed, and if not hold its queue place.

        For callers that must answer before costly work (the server answers 429 before it
        starts a response or touches images). The place counts toward the class queue
        length until `admit(ticket)` takes it over or `cancel_reservation(ticket)` frees it.
        """
        self._check_open()
        self._shed_check(ticket, self._clock())
        ticket.state = TicketState.RESERVED
        self._reserved[ticket.key] = ticket
        self._queued_per_class[ticket.class_name] = (
            self._queued_per_class.get(ticket.class_name, 0) + 1)

    def cancel_reservation(self, ticket: Ticket) -> None:
        """Free a reserved place that will not be used (idempotent)."""
        if self._reserved.pop(ticket.key, None) is None:
            return
        self._dec_class(ticket.class_name)
        ticket.state = TicketState.DONE

    def _check_open(self) -> None:
        if self._closed:
            raise EngineNotRunningError("admission is closed: the engine is shutting down")

    async def admit(self, ticket: Ticket, *, requeue: bool = False) -> None:
        """Wait until `ticket` may run in vLLM.

        A new ticket may be refused at once (RequestRejectedError), unless `reserve` already
        accepted it; a requeued (preempted) one never is: it was accepted already. Raises
        DeadlineExceededError if its queue deadline passes first. Cancellation removes it
        from the queue.
        """
        accepted = requeue or ticket.state is TicketState.RESERVED
        self.cancel_reservation(ticket)  # admit takes the reserved place over
        self._check_open()
        now = self._clock()
        if not accepted:
            self._shed_check(ticket, now)
        ticket.state = TicketState.QUEUED
        ticket.preempt_requested = False
        ticket._future = asyncio.get_running_loop().create_future()
        self._waiting[ticket.key] = ticket
        self._queued_per_class[ticket.class_name] = (
            self._queued_per_class.get(ticket.class_name, 0) + 1)
        self.metrics.add_queued(ticket.class_name, 1)
        self._pump()
        if ticket.state is TicketState.ADMITTED:
            return
        # A preempted request is no longer bound by its class's queue wait, only by its own
        # deadline: it already waited its turn once.
        deadline = ticket.request_deadline_at if requeue else ticket.queue_deadline_at
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        future = ticket._future
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if ticket.state is TicketState.ADMITTED:  # admitted as the timer fired
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
            if ticket.state is TicketState.ADMITTED:
                self.release(ticket, Release.CANCELLED)
            elif ticket.state is TicketState.QUEUED:
                self._unqueue(ticket)
                ticket.state = TicketState.DONE
                self.metrics.count(ticket.class_name, Event.CANCELLED)
            raise

    def _shed_check(self, ticket: Ticket, now: float) -> None:
        limits = self._limits(ticket)
        ahead = sum(
            1 for w in self._waiting.values()
            if self._policy.effective_level(self._view(w), now) <= ticket.level
        )
        # Waiting and reserved requests first fill the free slots (those of other classes
        # first, conservatively); what is left of this class's is its queue.
        pending_class = self._queued_per_class.get(ticket.class_name, 0)
        pending_other = len(self._waiting) + len(self._reserved) - pending_class
        free = max(0, self._window - len(self._admitted))
        queue_len = max(0, pending_class - max(0, free - pending_other))
        decision = shed_decision(
            queue_len=queue_len,
            max_queue_len=limits.max_queue_len,
            ahead=ahead,
            free_slots=max(0, self._window - len(self._admitted)),
            rate_per_s=self._rate.rate(now),
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
            f"{self._rate.rate(now) or 0:.2f} completions/s"
        )
        raise RequestRejectedError(
            f"request {ticket.request_id} shed: {detail}; retry after {retry_after_s:.1f}s",
            retry_after_s=retry_after_s,
            reason=reason.value,
        )

    def release(self, ticket: Ticket, outcome: Release) -> None:
        """Give an admitted ticket's slot back (exactly once per admission)."""
        if self._admitted.pop(ticket.key, None) is None:
            return
        self._preempting.discard(ticket.key)
        self.metrics.add_running(ticket.class_name, -1)
        now = self._clock()
        if outcome is Release.PREEMPTED:
            ticket.preemptions += 1
            ticket.state = TicketState.NEW
            self.metrics.count(ticket.class_name, Event.PREEMPTED)
        else:
            ticket.state = TicketState.DONE
            event = {Release.COMPLETED: Event.COMPLETED, Release.FAILED: Event.FAILED,
                     Release.CANCELLED: Event.CANCELLED}[outcome]
            self.metrics.count(ticket.class_name, event)
            if outcome is Release.COMPLETED:
                self._rate.record(now)
        self._pump()

    def observe_ttft(self, ticket: Ticket, ttft_s: float) -> None:
        self.metrics.observe_ttft(ticket.class_name, ttft_s)

    # -- engine feedback ----------------------------------------------------------------

    def set_window(self, window: int) -> None:
        """Change how many requests may be admitted at once (>= 1)."""
        if window < 1:
            raise ValueError(f"admission window must be >= 1, got {window}")
        self._window = window
        self._pump()

    @property
    def window(self) -> int:
        return self._window

    def update_kv_usage(self, usage: float) -> None:
        """vLLM's KV cache usage (0..1) from its latest scheduler stats."""
        self._kv_usage = usage
        self._pump()

    # -- core ---------------------------------------------------------------------------

    def _has_room(self) -> bool:
        if len(self._admitted) >= self._window:
            return False
        return not (self._admitted and self._kv_usage >= self._settings.kv_high_watermark)

    def _view(self, t: Ticket) -> WaitingView:
        return WaitingView(key=t.key, level=t.level, weight=t.weight, arrival_at=t.arrival_at)

    def _pump(self) -> None:
        if not self._waiting:
            return
        now = self._clock()
        ordered = self._policy.order((self._view(t) for t in self._waiting.values()), now)
        i = 0
        while i < len(ordered) and self._has_room():
            self._grant(self._waiting[ordered[i].key], now)
            i += 1
        if i < len(ordered) and self._policy.max_preemptions > 0:
            self._maybe_preempt(ordered[i:], now)

    def _grant(self, ticket: Ticket, now: float) -> None:
        self._unqueue(ticket)
        ticket.state = TicketState.ADMITTED
        ticket.admitted_at = now
        self._admitted[ticket.key] = ticket
        self.metrics.add_running(ticket.class_name, 1)
        if ticket.first_admitted_at is None:
            ticket.first_admitted_at = now
            self.metrics.count(ticket.class_name, Event.ADMITTED)
            self.metrics.observe_queue_wait(ticket.class_name, now - ticket.arrival_at)
        if ticket._future is not None and not ticket._future.done():
            ticket._future.set_result(None)

    def _maybe_preempt(self, waiting: list[WaitingView], now: float) -> None:
        running = [
            RunningView(key=t.key, level=t.level, output_tokens=t.output_tokens,
                        preemptions=t.preemptions, admitted_at=t.admitted_at or now)
            for t in self._admitted.values() if t.preempt_hook is not None
        ]
        covered = len(self._preempting)  # waiting requests a preemption already serves
        for w in waiting[: self._window]:
            if covered > 0:
                covered -= 1
                continue
            victim = self._policy.choose_victim(running, w.level, self._preempting)
            if victim is None:
                continue
            ticket = self._admitted[victim.key]
            self._preempting.add(victim.key)
            ticket.preempt_requested = True
            logger.debug("preempting %s (%s, %d tokens) for a waiting level-%d request",
                         ticket.request_id, ticket.class_name, ticket.output_tokens, w.level)
            assert ticket.preempt_hook is not None
            ticket.preempt_hook()

    def _unqueue(self, ticket: Ticket) -> None:
        if self._waiting.pop(ticket.key, None) is not None:
            self._dec_class(ticket.class_name)
            self.metrics.add_queued(ticket.class_name, -1)

    def _dec_class(self, class_name: str) -> None:
        self._queued_per_class[class_name] -= 1
        if not self._queued_per_class[class_name]:
            del self._queued_per_class[class_name]

    # -- inspection ---------------------------------------------------------------------

    def estimated_wait_s(self, level: int) -> float | None:
        now = self._clock()
        ahead = sum(1 for w in self._waiting.values()
                    if self._policy.effective_level(self._view(w), now) <= level)
        return estimated_wait_s(ahead, max(0, self._window - len(self._admitted)),
                                self._rate.rate(now))

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            window=self._window,
            admitted=len(self._admitted),
            queued=len(self._waiting),
            preempting=len(self._preempting),
            kv_cache_usage=self._kv_usage,
            service_rate_per_s=self._rate.rate(self._clock()),
            classes=self.metrics.snapshot(),
        )

    def held_state(self) -> dict[str, int]:
        """Per-request state still held (all zero when idle: the leak check)."""
        return {"waiting": len(self._waiting), "admitted": len(self._admitted),
                "preempting": len(self._preempting), "reserved": len(self._reserved),
                "class_queues": sum(self._queued_per_class.values())}

    def close(self) -> None:
        """Refuse new tickets and fail the queued ones."""
        self._closed = True
        for ticket in list(self._reserved.values()):
            self.cancel_reservation(ticket)
        for ticket in list(self._waiting.values()):
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            if ticket._future is not None and not ticket._future.done():
                ticket._future.set_exception(
                    EngineNotRunningError("the engine shut down while the request was queued"))
                ticket._future.exception()
