"""AdmissionController: pio's priority queue in front of all per-request work (frontend process,
asyncio).

A request waits here before anything is done for it: before the server renders its chat
template or loads its images, before pio decodes them. A ticket (`ticket.py`) moves

    QUEUED --grant--> PREPARING --started--> IN_ENGINE --release--> DONE

QUEUED tickets wait in priority order with aging (`policy.py`). The controller owns the
queue and the pump that grants from it, and composes the decisions:

- whether a ticket fits past the queue now: capacity, the preparing bound, the KV watermark
  (`capacity.py`, `CapacityGate`);
- SLO admission, where a class has targets and a step model is fitted: each request priced
  in engine seconds, its TTFT predicted, work let in through a bucket that keeps running
  requests' TPOT, the running set capped (`slo_pricing.py`, `SloPricing`). A ticket
  predicted to miss its TTFT target is refused at arrival (or later, once it can no longer
  make it), or, in a class that says so, served late behind all work that can still meet
  one; within a class cheaper requests go first (a virtual arrival time later by their
  work);
- shedding at arrival: a full class queue, or a deadline the measured service rate cannot
  meet (`policy.py`).
- with several API-server processes (`pio-vllm serve --api-server-count N`), the node's
  view: the other processes' granted and queued tickets, the shared work bucket and engine
  stats, read from and published to the node ledger (`node_ledger.py`) under its lock at
  every decision.

New requests are refused at once (RequestRejectedError with retry-after); a deadline that
passes while queued raises DeadlineExceededError; cancelling a queued request only removes
it from the queue. The controller never imports vLLM: it takes numbers (capacity, KV usage,
running count, the step model), so tests drive it with a fake engine and a fake clock.

Size: the queue, its pump and the arrival check read the same per-ticket state on every
decision, so they stay one class (~700 lines); each decision they compose is its own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pio_vllm.admission.capacity import CapacityGate
from pio_vllm.admission.metrics import AdmissionMetrics, ClassStats, Event
from pio_vllm.admission.node_ledger import NodeLedger
from pio_vllm.admission.policy import (
    AdmissionPolicy,
    RateMeter,
    ShedReason,
    WaitingView,
    shed_decision,
)
from pio_vllm.admission.slo_policy import WorkModel
from pio_vllm.admission.slo_pricing import (
    QueuedAhead,
    QueuedByLevel,
    SloPricing,
    SloStats,
    outranks,
)
from pio_vllm.admission.ticket import RELEASE_EVENT, Release, Ticket, TicketState, tighter
from pio_vllm.errors import DeadlineExceededError, EngineNotRunningError, RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass

logger = logging.getLogger(__name__)

__all__ = ["AdmissionController", "AdmissionStats", "Release", "SloStats", "Ticket",
           "TicketState"]


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
    slo: SloStats


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
        bound_top_class: bool = True,
        node: NodeLedger | None = None,
    ) -> None:
        """`bound_top_class`: apply `max_preparing` to the top class too (`capacity.py`:
        off in the OpenAI server, where preparing is vLLM's rendering). `node`: the ledger
        shared with the other API-server processes of this engine (`node_ledger.py`): then
        capacity, the preparing bound, the work bucket and the queue order are the node's,
        and below the top class each process prepares one request at a time."""
        self._settings = settings
        self._classes = classes
        self._default_class = default_class
        # where late requests go: below every class, in pio's queue and in vLLM's
        self._late_level = max((c.level for c in classes.values()), default=0) + 1
        self._policy = AdmissionPolicy(aging_s_per_level=settings.aging_s_per_level)
        self._gate = CapacityGate(
            capacity, settings.max_preparing,
            None if bound_top_class else min((c.level for c in classes.values()), default=0),
            settings.kv_high_watermark)
        self._clock = clock
        self._keys = itertools.count()
        self._waiting: dict[int, Ticket] = {}
        self._queued_per_class: dict[str, int] = {}
        self._granted: dict[int, Ticket] = {}  # PREPARING or IN_ENGINE
        self._rate = RateMeter(window=settings.rate_window)
        # SLO admission: on where a class has a target; active once a model is fitted.
        self._slo = SloPricing(settings, classes, clock())
        self._wake: asyncio.TimerHandle | None = None
        self._node = node
        self._poll: asyncio.TimerHandle | None = None
        self._seen_token: tuple[float, ...] = ()
        self.metrics = AdmissionMetrics(list(classes), registry)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # -- tickets ------------------------------------------------------------------------

    def ticket(self, request_id: str, level: int, class_name: str, deadline_at: float | None,
               slots: int = 1, *, prompt_tokens: int = 0, vision_tokens: int = 0,
               ttft_target_s: float | None = None,
               tpot_target_s: float | None = None) -> Ticket:
        """A ticket for a new request of a configured class. `deadline_at` is monotonic
        (None: no deadline); `slots` is the number of sequences it will run (n);
        `prompt_tokens` (text plus vision) and `vision_tokens` are what it is estimated to
        cost before anything is rendered (SLO admission prices it with them);
        `ttft_target_s` / `tpot_target_s` tighten the class's SLO for this request (a
        looser value than the class's is ignored: a request never loosens its SLO)."""
        cls = self._classes[class_name]
        now = self._clock()
        deadline = deadline_at
        if cls.max_queue_wait_s is not None:
            wait_deadline = now + cls.max_queue_wait_s
            deadline = wait_deadline if deadline is None else min(deadline, wait_deadline)
        return Ticket(key=next(self._keys), request_id=request_id, class_name=class_name,
                      level=level, weight=cls.weight, arrival_at=now,
                      queue_deadline_at=deadline, slots=max(1, slots),
                      prompt_tokens=prompt_tokens, vision_tokens=vision_tokens,
                      ttft_target_s=tighter(cls.ttft_target_s, ttft_target_s),
                      tpot_target_s=tighter(cls.tpot_target_s, tpot_target_s),
                      slo_ttft_s=tighter(cls.ttft_target_s, ttft_target_s))

    # -- the request's path -------------------------------------------------------------

    async def admit(self, ticket: Ticket) -> None:
        """Wait in the queue until `ticket` may be prepared and sent to vLLM.

        Raises RequestRejectedError at once when shed, DeadlineExceededError if its queue
        deadline passes first, EngineNotRunningError when the controller closes.
        Cancellation removes it from the queue.
        """
        self._check_open()
        now = self._clock()
        self._slo.price(ticket)
        with self._shared():
            self._shed_check(ticket, now)
        ticket.state = TicketState.QUEUED
        ticket.future = asyncio.get_running_loop().create_future()
        self._waiting[ticket.key] = ticket
        self._idle.clear()
        self._queued_per_class[ticket.class_name] = (
            self._queued_per_class.get(ticket.class_name, 0) + 1)
        self.metrics.add_queued(ticket.class_name, 1)
        self._pump()
        if ticket.state is TicketState.PREPARING:
            return
        if ticket.state is TicketState.QUEUED:
            self.metrics.count(ticket.class_name, Event.DEFERRED)
        deadline = ticket.queue_deadline_at
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        future = ticket.future
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except RequestRejectedError:  # no longer able to meet its TTFT target: shed
            raise
        except TimeoutError:
            if ticket.state is TicketState.PREPARING:  # granted as the timer fired
                return
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            self.metrics.count(ticket.class_name, Event.EXPIRED)
            self._pump()  # what it held back may go now
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
                self._pump()
            raise

    def started(self, ticket: Ticket) -> None:
        """The granted request was handed to vLLM: its preparing place frees."""
        if ticket.state is not TicketState.PREPARING:
            return
        ticket.state = TicketState.IN_ENGINE
        ticket.started_at = self._clock()
        if ticket.granted_at is not None:
            self._slo.prep.observe(ticket.vision_tokens, ticket.started_at - ticket.granted_at)
        self.metrics.add_preparing(ticket.class_name, -1)
        self._pump()

    def reprice(self, ticket: Ticket, prompt_tokens: int, vision_tokens: int) -> None:
        """A granted request's rendered prompt is known: its work becomes the measured size
        (the estimate at arrival was taken from the bucket; the difference is settled)."""
        if ticket.key not in self._granted:
            return
        ticket.prompt_tokens, ticket.vision_tokens = prompt_tokens, vision_tokens
        with self._shared():
            self._slo.reprice(ticket, self._clock())

    def release(self, ticket: Ticket, outcome: Release) -> None:
        """A granted request ended (idempotent): its place frees."""
        if self._granted.pop(ticket.key, None) is None:
            return
        if ticket.state is TicketState.PREPARING:
            self.metrics.add_preparing(ticket.class_name, -1)
            with self._shared():
                self._slo.refund_unspent(ticket, self._clock())  # it never reached vLLM
        ticket.state = TicketState.DONE
        self.metrics.add_running(ticket.class_name, -1)
        self.metrics.count(ticket.class_name, RELEASE_EVENT[outcome])
        if outcome is Release.COMPLETED:
            self._rate.record(self._clock())
        self._pump()
        self._check_idle()

    def observe_ttft(self, ticket: Ticket, ttft_s: float) -> None:
        """The request's first token arrived `ttft_s` after it did: its prefill work is done
        (the backlog no longer counts it), its service time teaches the prediction for its
        size (`FirstTokenGroups`), and the prediction made at its grant is scored (the
        predicted-vs-actual metric)."""
        self.metrics.observe_ttft(ticket.class_name, ttft_s)
        now = self._clock()
        ticket.first_token_at = now
        if ticket.work_s <= 0:  # granted before a step model was fitted (the warm-up)
            self._slo.price(ticket)
        if ticket.started_at is not None:
            self._slo.first_tokens.first_token(now, ticket.started_at, ticket.vision_tokens,
                                               ticket.work_s)
        if ticket.predicted_ttft_s is not None:
            self.metrics.observe_prediction(ticket.class_name, ticket.predicted_ttft_s, ttft_s)
        self._pump()

    def observe_finish(self, ticket: Ticket, ttft_s: float | None,
                       tpot_s: float | None) -> None:
        """A request finished: count it as meeting or missing its SLO."""
        ttft_target, tpot_target = ticket.slo_ttft_s, ticket.tpot_target_s
        if ttft_target is None and tpot_target is None:
            return
        met = ttft_s is not None and (ttft_target is None or ttft_s <= ttft_target)
        met = met and (tpot_target is None or tpot_s is None or tpot_s <= tpot_target)
        self.metrics.count(ticket.class_name, Event.SLO_MET if met else Event.SLO_MISSED)

    def observe_preemptions(self, ticket: Ticket, preemptions: int) -> None:
        """The request was preempted `preemptions` times inside vLLM."""
        if preemptions > 0:
            self.metrics.count(ticket.class_name, Event.PREEMPTED, preemptions)

    # -- engine feedback ----------------------------------------------------------------

    def set_capacity(self, capacity: int) -> None:
        """Change how many sequences may be past the queue at once (>= 1; with a node, for
        every process)."""
        self._gate.set_capacity(capacity)
        if self._node is not None:
            self._node.store_capacity(capacity)
        self._pump()

    @property
    def capacity(self) -> int:
        return self._gate.capacity

    def update_engine(self, kv_usage: float, running: int, inter_token_s_total: float = 0.0,
                      inter_tokens_total: int = 0) -> None:
        """vLLM's KV cache usage (0..1), running requests and cumulative inter-token times,
        from its per-step stats (every engine step: decisions are re-run only when what
        they depend on changed)."""
        crossed = self._gate.set_kv_usage(kv_usage)
        changed = running != self._slo.running
        self._slo.running = running
        now = self._clock()
        if self._node is not None and (crossed or changed):
            # vLLM sends each step's stats to one process only; the others decide again
            # when what their decisions read has moved (not on every step's stats)
            self._node.store_engine(kv_usage, running, now)
        self._slo.pace.record(now, inter_token_s_total, inter_tokens_total)
        if crossed or (self._slo.active and (
                changed or self._slo.pace_verdict(now, self._granted.values()))):
            self._pump()

    def set_work_model(self, model: WorkModel | None) -> None:
        """The step-time model SLO admission prices work with (None: not fitted yet)."""
        self._apply_model(model)
        if self._node is not None and model is not None:
            self._node.store_model((model.base_s, model.per_token_s, model.per_vision_token_s))
        self._pump()

    def _apply_model(self, model: WorkModel | None) -> None:
        self._slo.model = model
        for ticket in self._waiting.values():
            self._slo.price(ticket)

    def poke(self) -> None:
        """Re-run the grant decisions now (the work bucket refills with time)."""
        self._pump()

    # -- core ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineNotRunningError("admission is closed: the engine is shutting down")

    def _effective_capacity(self) -> int:
        cap = self._slo.max_running()
        if cap is None:
            return self._gate.capacity
        return min(self._gate.capacity, cap + self._settings.lookahead)

    def _view(self, t: Ticket) -> WaitingView:
        return WaitingView(key=t.key, level=t.level, weight=t.weight, arrival_at=t.arrival_at)

    def _pump(self) -> None:
        with self._shared():
            self._decide()
            if self._node is not None:
                self._seen_token = self._node.token()
        if self._node is not None and self._waiting and self._node.processes > 1:
            self._poll_after(self._node.poll_s)

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """Decide under the node's lock, with the node's bucket and latest engine stats, and
        publish this process's tickets after (no-op without a node)."""
        node = self._node
        if node is None:
            yield
            return
        with node.locked():
            seen = node.newer_engine()
            if seen is not None:
                self._gate.set_kv_usage(seen[0])
                self._slo.running = seen[1]
            model = node.newer_model()  # fitted by process 0's tuning loop
            if model is not None:
                self._apply_model(WorkModel(*model))
            capacity = node.newer_capacity()
            if capacity is not None:
                self._gate.set_capacity(capacity)
            bucket = node.load_bucket()
            if bucket is not None:
                self._slo.bucket.restore(*bucket)
            try:
                yield
            finally:
                node.store_bucket(*self._slo.bucket.state())
                node.publish(self._granted.values(),
                             ((t.arrival_at, self._slo.charge_s(t), t)
                              for t in self._waiting.values()))

    def _node_granted(self) -> list[Ticket]:
        """The tickets past the queue: this process's and, with a node, the others'."""
        granted = list(self._granted.values())
        if self._node is not None:
            granted.extend(self._node.remote_granted())
        return granted

    def _remote_queued(self) -> dict[int, Ticket]:
        if self._node is None:
            return {}
        return {t.key: t for t in self._node.remote_queued()}

    def _remote_view(self, t: Ticket) -> WaitingView:
        cls = self._classes.get(t.class_name)
        return WaitingView(key=t.key, level=t.level, weight=cls.weight if cls else 1.0,
                           arrival_at=t.arrival_at)

    def _render_turn_taken(self, ticket: Ticket) -> bool:
        """With several API-server processes, below the top class each prepares one request
        at a time: an urgent request arriving at any of them waits behind at most one
        batch render on its rendering thread."""
        if self._node is None or self._node.processes < 2 or (
                ticket.level == self._gate.unbounded_level):
            return False
        return any(t.state is TicketState.PREPARING and t.level != self._gate.unbounded_level
                   for t in self._granted.values())

    def _decide(self) -> None:
        if not self._waiting:
            return
        now = self._clock()
        slo = self._slo.active
        granted = self._node_granted()
        remote = self._remote_queued()
        if slo:
            self._slo.refresh_rate(now, granted)
        blocked_level: int | None = None  # FIFO: nothing of this level or lower passes
        ahead = QueuedByLevel()  # the tickets before this one that stay queued
        reserved_s = 0.0  # bucket work other processes' tickets ahead will take
        views = [self._view(t) for t in self._waiting.values()]
        views.extend(self._remote_view(t) for t in remote.values())
        for view in self._policy.order(views, now):
            ticket = self._waiting.get(view.key)
            if ticket is None:  # queued in another process: its place, not ours to grant
                other = remote[view.key]
                if blocked_level is None or other.level < blocked_level:
                    if self._gate.may_grant(other, granted, self._effective_capacity()):
                        granted.append(dataclasses.replace(other, state=TicketState.PREPARING))
                        reserved_s += other.charged_s
                        continue
                    blocked_level = other.level if blocked_level is None else min(
                        blocked_level, other.level)
                ahead.add(other.level, other.work_s, other.charged_s)
                continue
            charge = self._slo.charge_s(ticket)
            if blocked_level is not None and ticket.level >= blocked_level:
                ahead.add(ticket.level, ticket.work_s, charge)
                continue
            if slo and ticket.ttft_target_s is not None:
                predicted = self._slo.predict(ticket, now, ahead.upto(ticket.level), granted)
                if predicted > ticket.ttft_target_s:
                    if self._serves_late(ticket):
                        self._serve_late(ticket)
                        self._wake_after(0.0)  # its place in the order changed
                    else:
                        self._reject(ticket, predicted)
                    continue
            # Late work with no SLO work in the engine has no one's TPOT to keep; it never
            # enters while work that can still meet its TTFT waits for a first token (it
            # would share those prefill steps).
            unrationed = ticket.late and not self._slo.slo_work_granted(granted)
            capacity = self._gate.capacity if unrationed else self._effective_capacity()
            granted_now = not (ticket.late and self._ttft_work_pending(granted)) and (
                not self._render_turn_taken(ticket)) and (
                self._gate.may_grant(ticket, granted, capacity))
            if granted_now and slo and self._slo.paced and granted and not unrationed and (
                    not self._slo.bucket.fits(charge + reserved_s, now)) and (
                    not outranks(ticket, granted)):
                # Work enters as fast as running requests keep their TPOT target; a
                # request that outranks work in vLLM goes in anyway (vLLM serves it first),
                # and so does one into an idle engine (no one's TPOT to keep).
                granted_now = False
                self._wake_after(self._slo.bucket.wait_s(charge + reserved_s, now))
            if granted_now:
                self._grant(ticket, now, granted, take_work=not unrationed)
                granted.append(ticket)
            else:
                ahead.add(ticket.level, ticket.work_s, charge)
                blocked_level = ticket.level if blocked_level is None else min(
                    blocked_level, ticket.level)

    def _poll_after(self, delay_s: float) -> None:
        """Pump again soon: another process's tickets may have moved (one timer at a time)."""
        if self._poll is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def poll() -> None:
            self._poll = None
            node = self._node
            if node is not None and node.token() == self._seen_token:
                if self._waiting:  # nothing moved elsewhere: nothing new to decide
                    self._poll_after(delay_s)
                return
            self._pump()

        self._poll = loop.call_later(delay_s, poll)

    def _wake_after(self, delay_s: float) -> None:
        """Pump again once the work bucket has refilled enough (one timer at a time)."""
        if self._wake is not None and not self._wake.cancelled():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def wake() -> None:
            self._wake = None
            self._pump()

        self._wake = loop.call_later(min(max(delay_s, 0.001), 1.0), wake)

    def _reject(self, ticket: Ticket, predicted_s: float) -> None:
        """Shed a queued ticket that can no longer meet its TTFT target."""
        self._unqueue(ticket)
        ticket.state = TicketState.DONE
        self.metrics.count(ticket.class_name, Event.SHED)
        retry_after = max(0.1, predicted_s - (ticket.ttft_target_s or 0.0))
        error = RequestRejectedError(
            f"request {ticket.request_id} shed: predicted time to first token "
            f"{predicted_s:.2f}s is over class {ticket.class_name!r}'s ttft_target_s="
            f"{ticket.ttft_target_s}; retry after {retry_after:.1f}s",
            retry_after_s=retry_after, reason=ShedReason.SLO_INFEASIBLE.value)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.set_exception(error)

    def _serves_late(self, ticket: Ticket) -> bool:
        """Whether the ticket's class serves a request that cannot meet its TTFT target late
        instead of refusing it."""
        return self._classes[ticket.class_name].infeasible == "serve_late"

    def _serve_late(self, ticket: Ticket) -> None:
        """Its class serves infeasible requests late: the ticket drops its TTFT target and
        goes behind all work that can still meet one, in pio's queue and in vLLM's (where
        pio's scheduler preempts it first)."""
        ticket.late = True
        ticket.level = self._late_level
        ticket.ttft_target_s = None
        self.metrics.count(ticket.class_name, Event.LATE)

    @staticmethod
    def _ttft_work_pending(granted: list[Ticket]) -> bool:
        """Whether a request that can still meet its TTFT target is past the queue without
        its first token yet."""
        return any(not t.late and t.ttft_target_s is not None and t.first_token_at is None
                   for t in granted)

    def _grant(self, ticket: Ticket, now: float, granted: list[Ticket],
               take_work: bool = True) -> None:
        if self._slo.active:
            self._slo.take(ticket, now, take_work)
            ticket.predicted_ttft_s = self._slo.predicted_at_grant(ticket, now, granted)
        self._unqueue(ticket)
        ticket.state = TicketState.PREPARING
        ticket.granted_at = now
        self._granted[ticket.key] = ticket
        self.metrics.add_running(ticket.class_name, 1)
        self.metrics.add_preparing(ticket.class_name, 1)
        self.metrics.count(ticket.class_name, Event.ADMITTED)
        self.metrics.observe_queue_wait(ticket.class_name, now - ticket.arrival_at)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.set_result(None)

    def _shed_check(self, ticket: Ticket, now: float) -> None:
        limits = self._classes[ticket.class_name]
        granted = self._node_granted()
        # queued here and, with a node, in the other API-server processes (views by key)
        queued = {t.key: (t, self._view(t)) for t in self._waiting.values()}
        queued.update((k, (t, self._remote_view(t))) for k, t in self._remote_queued().items())
        ahead = sum(t.slots for t, view in queued.values()
                    if self._policy.effective_level(view, now) <= ticket.level)
        slots, _ = self._gate.past_queue(ticket.level, granted)
        free = max(0, self._gate.capacity - slots)
        # Waiting requests that free capacity will take at once (other classes' first,
        # conservatively; the preparing bound only spaces them out) are not a queue.
        in_class = sum(1 for t, _ in queued.values() if t.class_name == ticket.class_name)
        others = sum(t.slots for t, _ in queued.values()
                     if t.level <= ticket.level and t.class_name != ticket.class_name)
        queue_len = max(0, in_class - max(0, free - others))
        rate = self._rate.rate(now)
        # Where SLO admission predicts the ticket's TTFT (below), that prediction decides
        # whether its queue deadline can be met, not the completion rate: measured on a
        # burst after an idle spell, the rate was the warm-up's (2 per s) and refused 10 of
        # 24 interactive requests as "11 ahead" while those admitted waited ~75 ms.
        target = ticket.ttft_target_s if self._slo.active else None
        decision = shed_decision(
            queue_len=queue_len, max_queue_len=limits.max_queue_len, ahead=ahead,
            free_slots=free, rate_per_s=rate,
            deadline_in_s=None if ticket.queue_deadline_at is None or target is not None
            else ticket.queue_deadline_at - now,
        )
        if decision is None and target is not None:
            self._slo.refresh_rate(now, granted)
            mine = self._policy.effective_level(self._view(ticket), now)
            work_ahead = QueuedAhead()
            for t, view in queued.values():
                # ahead in the order and of its class or above (`QueuedByLevel`)
                if self._policy.effective_level(view, now) <= mine and t.level <= ticket.level:
                    work_ahead.add(t.work_s, t.charged_s if t.key < 0 else
                                   self._slo.charge_s(t))
            predicted = self._slo.predict(ticket, now, work_ahead, granted)
            if predicted > target and self._serves_late(ticket):
                self._serve_late(ticket)
            elif predicted > target:
                ticket.state = TicketState.DONE
                self.metrics.count(ticket.class_name, Event.SHED)
                retry_after = max(0.1, predicted - target)
                raise RequestRejectedError(
                    f"request {ticket.request_id} shed: predicted time to first token "
                    f"{predicted:.2f}s is over class {ticket.class_name!r}'s ttft_target_s="
                    f"{target} ({work_ahead.work_s:.2f}s of queued and "
                    f"{self._slo.backlog(granted, ticket.level, now):.2f}s of admitted "
                    f"engine work ahead); retry after {retry_after:.1f}s",
                    retry_after_s=retry_after, reason=ShedReason.SLO_INFEASIBLE.value)
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
        top = max((c.level for c in self._classes.values()), default=0)
        return AdmissionStats(
            capacity=self._effective_capacity(),
            max_preparing=self._gate.max_preparing,
            queued=len(self._waiting),
            preparing=preparing,
            in_engine=len(self._granted) - preparing,
            kv_cache_usage=self._gate.kv_usage,
            service_rate_per_s=self._rate.rate(self._clock()),
            classes=self.metrics.snapshot(),
            slo=self._slo.stats(self._granted.values(), top, self._clock()),
        )

    def queued_count(self) -> int:
        """Requests waiting in pio's queue (all classes; with a node, in every process)."""
        return len(self._waiting) + len(self._remote_queued())

    def preparing_count(self) -> int:
        """Requests past pio's queue being rendered or prepared, not yet in vLLM (with a
        node, in every process)."""
        return sum(1 for t in self._node_granted() if t.state is TicketState.PREPARING)

    def load(self) -> int:
        """Requests held: queued, being prepared or in vLLM (sequences counted; with a
        node, the node's)."""
        return sum(t.slots for t in self._waiting.values()) + sum(
            t.slots for t in self._remote_queued().values()) + sum(
            t.slots for t in self._node_granted())

    def saturated(self) -> bool:
        """True while every class's queue is full: every new request would be shed."""
        return all(self._queued_per_class.get(name, 0) >= cls.max_queue_len
                   for name, cls in self._classes.items())

    def held_state(self) -> dict[str, int]:
        """Per-request state still held (all zero when idle: the leak check)."""
        return {"waiting": len(self._waiting), "granted": len(self._granted),
                "class_queues": sum(self._queued_per_class.values())}

    def close(self) -> None:
        """Refuse new tickets and fail the queued ones."""
        self._closed = True
        if self._wake is not None:
            self._wake.cancel()
        if self._poll is not None:
            self._poll.cancel()
        for ticket in list(self._waiting.values()):
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(
                    EngineNotRunningError("the engine shut down while the request was queued"))
                ticket.future.exception()
        if self._node is not None:
            with self._shared():  # the queued ones leave the node's order
                pass
