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
  never behind more than that). With `bound_top_class=False` (the OpenAI server, where
  preparing is vLLM's rendering, one request at a time on its own thread) the top class is
  bounded by capacity only: nothing outranks it, and taking turns through pio would only
  add a round trip per request of an urgent burst. In-process, preparing is pio's intake
  on the decode workers, where a burst prepared at once shares the CPU and every request
  in it is late, so the bound holds for every class;
- vLLM's KV cache usage is under the high watermark, unless the ticket outranks something
  already in vLLM (vLLM frees KV by preempting the lowest priority first).

New requests are refused at once (RequestRejectedError with retry-after) when their class
queue is full or their deadline cannot be met at the measured service rate; a deadline that
passes while queued raises DeadlineExceededError; cancelling a queued request only removes it
from the queue.

SLO admission (`slo_policy.py`), where a class has ttft_target_s / tpot_target_s and once a
step-time model is fitted: each request is priced in engine seconds from its estimated
prompt and vision tokens; one predicted to miss its TTFT target is refused at arrival (or
later, once it no longer can make it) instead of admitted to miss; prefill work enters vLLM
through a bucket that refills as fast as running requests keep their TPOT target (the step
model's rate, corrected by the pace running requests are decoding at), and the
running set is capped where one decode step would exceed it; within a class cheaper
requests go first (a virtual arrival time later by their work). The controller never
imports vLLM: it takes numbers (capacity, KV usage, running count, the step model), so
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
from pio_vllm.admission.policy import (
    AdmissionPolicy,
    RateMeter,
    ShedReason,
    WaitingView,
    shed_decision,
)
from pio_vllm.admission.slo_policy import (
    MIN_WORK_RATE,
    DecodePace,
    FirstTokenGroups,
    PrepTimes,
    ServiceCalibration,
    TpotFeedback,
    WorkBucket,
    WorkModel,
    backlog_s,
    predicted_ttft_s,
)
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
    prompt_tokens: int = 0  # estimated before admission (text plus vision tokens)
    vision_tokens: int = 0
    ttft_target_s: float | None = None  # its class's SLO
    state: TicketState = TicketState.NEW
    granted_at: float | None = None
    first_token_at: float | None = None
    work_s: float = 0.0  # engine seconds of its prefill, from the step model (SLO admission)
    started_at: float | None = None  # handed to vLLM
    predicted_ttft_s: float | None = None  # at its grant, arrival to first token
    late: bool = False  # predicted to miss its TTFT target and kept (serve_late): no SLO
    rationed: bool = True  # its work was taken from the work bucket at its grant
    charged_s: float = 0.0  # what its grant took from the work bucket (`_charge_s`)
    _future: asyncio.Future[None] | None = field(default=None, repr=False)


@dataclass
class _QueuedAhead:
    """The requests queued before one whose TTFT is predicted: their modelled work (the
    engine's time for them, through the overall calibration) and their charges (what the
    work bucket must let in first, `_charge_s`)."""

    work_s: float = 0.0
    charge_s: float = 0.0

    def add(self, work_s: float, charge_s: float) -> None:
        self.work_s += work_s
        self.charge_s += charge_s


@dataclass(frozen=True)
class SloStats:
    """SLO admission's state: the step model it prices with, the work rate it allows."""

    active: bool  # a class has an SLO and a step model is fitted
    model: WorkModel | None
    work_rate: float  # engine-seconds of prefill work admitted per second
    tpot_scale: float  # the share of the model's work rate TPOT feedback allows (0..1]
    max_running: int | None  # running-set cap from the TPOT target (None: no cap)
    calibration: float  # actual / modelled service time, running, over all sizes
    # seconds per vision token (text: per request) by size class (slo_policy.size_class)
    service_s_by_size: dict[int, float]
    # seconds from grant to hand-over to vLLM (rendering, image processing) by size class
    prep_s_by_size: dict[int, float]
    backlog_s: float  # engine seconds of admitted work still to run before a first token


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
    ) -> None:
        """`bound_top_class`: apply `max_preparing` to the top class too (see above)."""
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self._settings = settings
        self._classes = classes
        self._default_class = default_class
        # where late requests go: below every class, in pio's queue and in vLLM's
        self._late_level = max((c.level for c in classes.values()), default=0) + 1
        self._policy = AdmissionPolicy(aging_s_per_level=settings.aging_s_per_level)
        self._capacity = capacity
        self._max_preparing = settings.max_preparing
        self._unbounded_level = None if bound_top_class else min(
            (c.level for c in classes.values()), default=0)
        self._clock = clock
        self._keys = itertools.count()
        self._waiting: dict[int, Ticket] = {}
        self._queued_per_class: dict[str, int] = {}
        self._granted: dict[int, Ticket] = {}  # PREPARING or IN_ENGINE
        self._kv_usage = 0.0
        self._rate = RateMeter(window=settings.rate_window)
        # SLO admission: on where a class has a target; active once a model is fitted.
        targets = [c.tpot_target_s for c in classes.values() if c.tpot_target_s]
        self._tpot_target = min(targets) if targets else None
        self._slo_on = settings.slo_admission and any(
            c.ttft_target_s or c.tpot_target_s for c in classes.values())
        self._model: WorkModel | None = None
        self._running = 0
        self._bucket = WorkBucket(settings.work_burst_s, clock())
        self._calibration = ServiceCalibration()
        self._first_tokens = FirstTokenGroups(self._calibration)
        self._prep = PrepTimes()
        self._tpot_feedback = TpotFeedback()
        self._pace = DecodePace()
        self._wake: asyncio.TimerHandle | None = None
        self.metrics = AdmissionMetrics(list(classes), registry)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # -- tickets ------------------------------------------------------------------------

    def ticket(self, request_id: str, level: int, class_name: str, deadline_at: float | None,
               slots: int = 1, *, prompt_tokens: int = 0, vision_tokens: int = 0) -> Ticket:
        """A ticket for a new request of a configured class. `deadline_at` is monotonic
        (None: no deadline); `slots` is the number of sequences it will run (n);
        `prompt_tokens` (text plus vision) and `vision_tokens` are what it is estimated to
        cost before anything is rendered (SLO admission prices it with them)."""
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
                      ttft_target_s=cls.ttft_target_s)

    # -- the request's path -------------------------------------------------------------

    async def admit(self, ticket: Ticket) -> None:
        """Wait in the queue until `ticket` may be prepared and sent to vLLM.

        Raises RequestRejectedError at once when shed, DeadlineExceededError if its queue
        deadline passes first, EngineNotRunningError when the controller closes.
        Cancellation removes it from the queue.
        """
        self._check_open()
        now = self._clock()
        self._price(ticket)
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
        if ticket.state is TicketState.QUEUED:
            self.metrics.count(ticket.class_name, Event.DEFERRED)
        deadline = ticket.queue_deadline_at
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        future = ticket._future
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
        ticket.started_at = self._clock()
        if ticket.granted_at is not None:
            self._prep.observe(ticket.vision_tokens, ticket.started_at - ticket.granted_at)
        self.metrics.add_preparing(ticket.class_name, -1)
        self._pump()

    def reprice(self, ticket: Ticket, prompt_tokens: int, vision_tokens: int) -> None:
        """A granted request's rendered prompt is known: its work becomes the measured size
        (the estimate at arrival was taken from the bucket; the difference is settled)."""
        if ticket.key not in self._granted:
            return
        ticket.prompt_tokens, ticket.vision_tokens = prompt_tokens, vision_tokens
        self._price(ticket)
        if self._slo_active() and ticket.rationed:
            charge = self._charge_s(ticket)
            self._bucket.refund(ticket.charged_s - charge, self._clock())
            ticket.charged_s = charge

    def release(self, ticket: Ticket, outcome: Release) -> None:
        """A granted request ended (idempotent): its place frees."""
        if self._granted.pop(ticket.key, None) is None:
            return
        if ticket.state is TicketState.PREPARING:
            self.metrics.add_preparing(ticket.class_name, -1)
            if self._slo_active() and ticket.rationed:  # it never reached vLLM: not spent
                self._bucket.refund(ticket.charged_s, self._clock())
        ticket.state = TicketState.DONE
        self.metrics.add_running(ticket.class_name, -1)
        self.metrics.count(ticket.class_name, _RELEASE_EVENT[outcome])
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
            self._price(ticket)
        if ticket.started_at is not None:
            self._first_tokens.first_token(now, ticket.started_at, ticket.vision_tokens,
                                           ticket.work_s)
        if ticket.predicted_ttft_s is not None:
            self.metrics.observe_prediction(ticket.class_name, ticket.predicted_ttft_s, ttft_s)
        self._pump()

    def observe_finish(self, ticket: Ticket, ttft_s: float | None,
                       tpot_s: float | None) -> None:
        """A request finished: count it as meeting or missing its class's SLO."""
        cls = self._classes[ticket.class_name]
        if cls.ttft_target_s is None and cls.tpot_target_s is None:
            return
        met = ttft_s is not None and (cls.ttft_target_s is None or ttft_s <= cls.ttft_target_s)
        met = met and (cls.tpot_target_s is None or tpot_s is None
                       or tpot_s <= cls.tpot_target_s)
        self.metrics.count(ticket.class_name, Event.SLO_MET if met else Event.SLO_MISSED)

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

    def update_engine(self, kv_usage: float, running: int, inter_token_s_total: float = 0.0,
                      inter_tokens_total: int = 0) -> None:
        """vLLM's KV cache usage (0..1), running requests and cumulative inter-token times,
        from its per-step stats (every engine step: decisions are re-run only when what
        they depend on changed)."""
        watermark = self._settings.kv_high_watermark
        crossed = (kv_usage < watermark) != (self._kv_usage < watermark)
        changed = running != self._running
        self._kv_usage = kv_usage
        self._running = running
        now = self._clock()
        self._pace.record(now, inter_token_s_total, inter_tokens_total)
        if crossed or (self._slo_active() and (changed or self._pace_verdict(now))):
            self._pump()

    def set_work_model(self, model: WorkModel | None) -> None:
        """The step-time model SLO admission prices work with (None: not fitted yet)."""
        self._model = model
        for ticket in self._waiting.values():
            self._price(ticket)
        self._pump()

    def poke(self) -> None:
        """Re-run the grant decisions now (the work bucket refills with time)."""
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

    def _slo_active(self) -> bool:
        return self._slo_on and self._model is not None

    def _price(self, ticket: Ticket) -> None:
        if self._model is not None:
            ticket.work_s = self._model.work_s(ticket.prompt_tokens, ticket.vision_tokens)

    def _max_running(self) -> int | None:
        """The running-set size whose decode step still keeps the TPOT target."""
        model = self._model
        if not self._slo_active() or self._tpot_target is None or model is None or (
                model.per_token_s <= 0):
            return None
        room = self._tpot_target * self._settings.slo_safety - model.base_s
        return max(1, int(room / model.per_token_s))

    def _effective_capacity(self) -> int:
        cap = self._max_running()
        if cap is None:
            return self._capacity
        return min(self._capacity, cap + self._settings.lookahead)

    def _service_s(self, ticket: Ticket) -> float:
        """Engine seconds from when vLLM can start on the request to its first token."""
        return self._calibration.service_s(ticket.vision_tokens, ticket.work_s)

    def _charge_s(self, ticket: Ticket) -> float:
        """What the request's prefill costs the work bucket: the step model's price, or the
        service time learnt for its size where that is less. A service time runs from the
        hand-over (or the previous first token) to the first token, so it holds the
        request's prefill and whatever else the engine did meanwhile: an upper bound of its
        cost. The model priced a 320x240 image request at 4x the ~20 ms it took on the tiny
        CPU model; requests entering an idle engine, which the bucket does not hold back,
        then drove it into a debt that grew with every request, and the refill wait it
        predicted refused interactive requests (1.03 s predicted) with nothing queued or
        running. Under a burst the service time also holds other requests' decode steps
        (1.1-1.8x the model's price, measured), which would ration prefills twice."""
        return min(ticket.work_s, self._service_s(ticket))

    def _backlog(self, level: int, now: float) -> float:
        """Engine seconds of granted work of level <= `level` still to run before a first
        token (vLLM serves it before a new request of `level`)."""
        ahead = [t for t in self._granted.values()
                 if t.level <= level and t.first_token_at is None]
        started = [t.started_at for t in ahead if t.started_at is not None]
        drain_started_at = min(started, default=None)
        last_first_token = self._first_tokens.last_at
        if drain_started_at is not None and last_first_token is not None:
            drain_started_at = max(drain_started_at, last_first_token)
        return backlog_s(sum(self._service_s(t) for t in ahead), drain_started_at, now)

    def _may_grant(self, ticket: Ticket, unrationed: bool = False) -> bool:
        """`unrationed`: late work with no SLO work in the engine, bounded by capacity only
        (not by the running-set cap that keeps TPOT)."""
        slots, preparing = self._past_queue(ticket.level)
        if preparing >= self._max_preparing and ticket.level != self._unbounded_level:
            return False
        capacity = self._capacity if unrationed else self._effective_capacity()
        if slots and slots + ticket.slots > capacity:
            return False
        if self._kv_usage < self._settings.kv_high_watermark:
            return True
        # KV is nearly full: only a request that outranks something in vLLM goes in
        # (vLLM's priority policy frees KV from the lowest priority first).
        return any(t.level > ticket.level for t in self._granted.values())

    def _view(self, t: Ticket) -> WaitingView:
        # Cheaper first within a class: a request counts as arriving later by its work.
        delay = self._settings.cheap_first_factor * t.work_s if self._slo_active() else 0.0
        return WaitingView(key=t.key, level=t.level, weight=t.weight,
                           arrival_at=t.arrival_at + delay)

    def _outranks_granted(self, ticket: Ticket) -> bool:
        """Whether vLLM holds work of a lower priority: such a ticket enters regardless of
        the work bucket (vLLM serves it first)."""
        return any(t.level > ticket.level for t in self._granted.values())

    def _predict(self, ticket: Ticket, now: float, ahead: _QueuedAhead) -> float:
        # No bucket wait for a ticket the bucket does not hold back (see `_pump`): one that
        # outranks work in vLLM (work served late drains the bucket, and interactive
        # requests were shed for it), or the first into an idle engine.
        held = not self._outranks_granted(ticket) and (
            bool(self._granted) or ahead.charge_s > 0)
        entry_s = self._bucket.wait_s(self._charge_s(ticket), now,
                                      ahead_s=ahead.charge_s) if held else 0.0
        return predicted_ttft_s(
            waited_s=now - ticket.arrival_at,
            entry_s=entry_s,
            backlog_s=self._backlog(ticket.level, now),
            ahead_service_s=self._calibration.overall * ahead.work_s,
            own_service_s=self._service_s(ticket),
            prep_s=self._prep.prep_s(ticket.vision_tokens))

    def _pace_verdict(self, now: float) -> bool:
        """Let the decode pace correct the work rate (once per interval); True if the scale
        moved."""
        if self._tpot_target is None or not self._slo_work_granted():
            return False  # nothing whose TPOT is kept is decoding
        kept = self._pace.verdict(now, self._tpot_target)
        if kept is None:
            return False
        before = self._tpot_feedback.scale
        self._tpot_feedback.observe(kept)
        return self._tpot_feedback.scale != before

    def _refresh_rate(self, now: float) -> None:
        self._pace_verdict(now)
        if self._model is not None:
            rate = self._model.max_work_rate(
                self._running, self._tpot_target, self._settings.slo_safety)
            self._bucket.set_rate(max(MIN_WORK_RATE, rate * self._tpot_feedback.scale), now)

    def _pump(self) -> None:
        if not self._waiting:
            return
        now = self._clock()
        slo = self._slo_active()
        if slo:
            self._refresh_rate(now)
        blocked_level: int | None = None  # FIFO: nothing of this level or lower passes
        ahead = _QueuedAhead()  # the tickets before this one that stay queued
        for view in self._policy.order((self._view(t) for t in self._waiting.values()), now):
            ticket = self._waiting[view.key]
            charge = self._charge_s(ticket)
            if blocked_level is not None and ticket.level >= blocked_level:
                ahead.add(ticket.work_s, charge)
                continue
            if slo and ticket.ttft_target_s is not None:
                predicted = self._predict(ticket, now, ahead)
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
            unrationed = ticket.late and not self._slo_work_granted()
            granted = not (ticket.late and self._ttft_work_pending()) and self._may_grant(
                ticket, unrationed)
            if granted and slo and self._granted and not unrationed and not self._bucket.fits(
                    charge, now) and not self._outranks_granted(ticket):
                # Work enters as fast as running requests keep their TPOT target; a
                # request that outranks work in vLLM goes in anyway (vLLM serves it first),
                # and so does one into an idle engine (no one's TPOT to keep).
                granted = False
                self._wake_after(self._bucket.wait_s(charge, now))
            if granted:
                self._grant(ticket, now, take_work=not unrationed)
            else:
                ahead.add(ticket.work_s, charge)
                blocked_level = ticket.level if blocked_level is None else min(
                    blocked_level, ticket.level)

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
        if ticket._future is not None and not ticket._future.done():
            ticket._future.set_exception(error)

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

    def _ttft_work_pending(self) -> bool:
        """Whether a request that can still meet its TTFT target is past the queue without
        its first token yet."""
        return any(not t.late and t.ttft_target_s is not None and t.first_token_at is None
                   for t in self._granted.values())

    def _slo_work_granted(self) -> bool:
        """Whether a request with a TPOT target (not served late) is past the queue."""
        return any(not t.late and self._classes[t.class_name].tpot_target_s is not None
                   for t in self._granted.values())

    def _grant(self, ticket: Ticket, now: float, take_work: bool = True) -> None:
        if self._slo_active():
            ticket.rationed = take_work
            if take_work:
                ticket.charged_s = self._charge_s(ticket)
                self._bucket.take(ticket.charged_s, now)
            ticket.predicted_ttft_s = predicted_ttft_s(
                waited_s=now - ticket.arrival_at, entry_s=0.0,
                backlog_s=self._backlog(ticket.level, now), ahead_service_s=0.0,
                own_service_s=self._service_s(ticket),
                prep_s=self._prep.prep_s(ticket.vision_tokens))
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
        # Where SLO admission predicts the ticket's TTFT (below), that prediction decides
        # whether its queue deadline can be met, not the completion rate: measured on a
        # burst after an idle spell, the rate was the warm-up's (2 per s) and refused 10 of
        # 24 interactive requests as "11 ahead" while those admitted waited ~75 ms.
        target = ticket.ttft_target_s if self._slo_active() else None
        decision = shed_decision(
            queue_len=queue_len, max_queue_len=limits.max_queue_len, ahead=ahead,
            free_slots=free, rate_per_s=rate,
            deadline_in_s=None if ticket.queue_deadline_at is None or target is not None
            else ticket.queue_deadline_at - now,
        )
        if decision is None and target is not None:
            self._refresh_rate(now)
            mine = self._policy.effective_level(self._view(ticket), now)
            queued = _QueuedAhead()
            for t in self._waiting.values():
                if self._policy.effective_level(self._view(t), now) <= mine:
                    queued.add(t.work_s, self._charge_s(t))
            predicted = self._predict(ticket, now, queued)
            if predicted > target and self._serves_late(ticket):
                self._serve_late(ticket)
            elif predicted > target:
                ticket.state = TicketState.DONE
                self.metrics.count(ticket.class_name, Event.SHED)
                retry_after = max(0.1, predicted - target)
                raise RequestRejectedError(
                    f"request {ticket.request_id} shed: predicted time to first token "
                    f"{predicted:.2f}s is over class {ticket.class_name!r}'s ttft_target_s="
                    f"{target} ({queued.work_s:.2f}s of queued and "
                    f"{self._backlog(ticket.level, now):.2f}s of admitted engine work ahead); "
                    f"retry after {retry_after:.1f}s",
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
        slo = SloStats(
            active=self._slo_active(), model=self._model, work_rate=self._bucket.rate,
            tpot_scale=self._tpot_feedback.scale,
            max_running=self._max_running(), calibration=self._calibration.overall,
            service_s_by_size=self._calibration.by_size(),
            prep_s_by_size=self._prep.by_size(),
            backlog_s=self._backlog(max((c.level for c in self._classes.values()), default=0),
                                    self._clock()))
        return AdmissionStats(
            capacity=self._effective_capacity(),
            max_preparing=self._max_preparing,
            queued=len(self._waiting),
            preparing=preparing,
            in_engine=len(self._granted) - preparing,
            kv_cache_usage=self._kv_usage,
            service_rate_per_s=self._rate.rate(self._clock()),
            classes=self.metrics.snapshot(),
            slo=slo,
        )

    def queued_count(self) -> int:
        """Requests waiting in pio's queue (all classes)."""
        return len(self._waiting)

    def load(self) -> int:
        """Requests held: queued, being prepared or in vLLM (sequences counted)."""
        return sum(t.slots for t in self._waiting.values()) + sum(
            t.slots for t in self._granted.values())

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
        for ticket in list(self._waiting.values()):
            self._unqueue(ticket)
            ticket.state = TicketState.DONE
            if ticket._future is not None and not ticket._future.done():
                ticket._future.set_exception(
                    EngineNotRunningError("the engine shut down while the request was queued"))
                ticket._future.exception()
