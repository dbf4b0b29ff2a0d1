"""SloPricing: SLO admission's decisions (frontend process, pure; the primitives are in
`slo_policy.py`).

Where a class has ttft_target_s / tpot_target_s and once a step-time model is fitted:

- each request is priced in engine seconds from its estimated prompt and vision tokens
  (`price`); what it charges the work bucket is that price, or the service time learnt for
  its size where that is less (`charge_s`);
- its TTFT is predicted (`predict`): its wait so far, plus the longer of the bucket's wait
  (behind the work queued ahead of it) with its preparation and the engine's backlog with
  the queued work ahead, plus its own service time;
- prefill work enters vLLM through a bucket that refills as fast as running requests keep
  their TPOT target (`refresh_rate`: the step model's rate, corrected by the pace running
  requests decode at), and the running set is capped where one decode step would exceed
  the target (`max_running`).

The controller asks; it decides what to do with a prediction (refuse, serve late, wait).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

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
from pio_vllm.admission.ticket import Ticket
from pio_vllm.settings import AdmissionSettings, PriorityClass


@dataclass
class QueuedAhead:
    """The requests queued before one whose TTFT is predicted: their modelled work (the
    engine's time for them, through the overall calibration) and their charges (what the
    work bucket must let in first, `SloPricing.charge_s`)."""

    work_s: float = 0.0
    charge_s: float = 0.0

    def add(self, work_s: float, charge_s: float) -> None:
        self.work_s += work_s
        self.charge_s += charge_s


class QueuedByLevel:
    """The requests before one in pio's queue order that stay queued, by priority level. A
    request waits only for those of its own level or a higher class: one of a lower class
    that aging moved ahead of it in the order is overtaken anyway (it does not count against
    the request's capacity, the work bucket lets the request in first, and vLLM serves it
    first). Counting such requests refused 2303 interactive requests in the simulator's H100
    projection (2 replicas under a batch flood: "14.76s of queued work ahead") that vLLM's
    own priority scheduling served within their 0.5 s target."""

    def __init__(self) -> None:
        self._by_level: dict[int, QueuedAhead] = {}

    def add(self, level: int, work_s: float, charge_s: float) -> None:
        self._by_level.setdefault(level, QueuedAhead()).add(work_s, charge_s)

    def upto(self, level: int) -> QueuedAhead:
        """What a request of `level` waits behind."""
        out = QueuedAhead()
        for lvl, ahead in self._by_level.items():
            if lvl <= level:
                out.add(ahead.work_s, ahead.charge_s)
        return out


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


def outranks(ticket: Ticket, granted: Collection[Ticket]) -> bool:
    """Whether vLLM holds work of a lower priority than `ticket` (vLLM serves it first)."""
    return any(t.level > ticket.level for t in granted)


class SloPricing:
    """The step model, the work bucket and what is learnt from served requests."""

    def __init__(self, settings: AdmissionSettings, classes: dict[str, PriorityClass],
                 now: float) -> None:
        self._settings = settings
        self._classes = classes
        targets = [c.tpot_target_s for c in classes.values() if c.tpot_target_s]
        self.tpot_target = min(targets) if targets else None
        # Priced and refused: any request with a TTFT target, its class's or its own (an
        # SLO header). Paced (the work bucket rations what enters vLLM): only where a class
        # has a target, so a request's own header never slows the others.
        self.on = settings.slo_admission
        self.paced = self.on and any(
            c.ttft_target_s or c.tpot_target_s for c in classes.values())
        self.model: WorkModel | None = None
        self.running = 0  # requests vLLM runs, from its per-step stats
        self.bucket = WorkBucket(settings.work_burst_s, now)
        self.calibration = ServiceCalibration()
        self.first_tokens = FirstTokenGroups(self.calibration)
        self.prep = PrepTimes()
        self.tpot_feedback = TpotFeedback()
        self.pace = DecodePace()

    @property
    def active(self) -> bool:
        return self.on and self.model is not None

    # -- prices -------------------------------------------------------------------------

    def price(self, ticket: Ticket) -> None:
        if self.model is not None:
            ticket.work_s = self.model.work_s(ticket.prompt_tokens, ticket.vision_tokens)

    def service_s(self, ticket: Ticket) -> float:
        """Engine seconds from when vLLM can start on the request to its first token."""
        return self.calibration.service_s(ticket.vision_tokens, ticket.work_s)

    def charge_s(self, ticket: Ticket) -> float:
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
        return min(ticket.work_s, self.service_s(ticket))

    def max_running(self) -> int | None:
        """The running-set size whose decode step still keeps the TPOT target."""
        model = self.model
        if not self.active or self.tpot_target is None or model is None or (
                model.per_token_s <= 0):
            return None
        room = self.tpot_target * self._settings.slo_safety - model.base_s
        return max(1, int(room / model.per_token_s))

    # -- predictions --------------------------------------------------------------------

    def backlog(self, granted: Collection[Ticket], level: int, now: float) -> float:
        """Engine seconds of granted work of level <= `level` still to run before a first
        token (vLLM serves it before a new request of `level`)."""
        ahead = [t for t in granted if t.level <= level and t.first_token_at is None]
        started = [t.started_at for t in ahead if t.started_at is not None]
        drain_started_at = min(started, default=None)
        last_first_token = self.first_tokens.last_at
        if drain_started_at is not None and last_first_token is not None:
            drain_started_at = max(drain_started_at, last_first_token)
        return backlog_s(sum(self.service_s(t) for t in ahead), drain_started_at, now)

    def predict(self, ticket: Ticket, now: float, ahead: QueuedAhead,
                granted: Collection[Ticket]) -> float:
        """The ticket's TTFT if it waits behind `ahead`."""
        # No bucket wait for a ticket the bucket does not hold back (see the controller's
        # pump): one that outranks work in vLLM (work served late drains the bucket, and
        # interactive requests were shed for it), or the first into an idle engine.
        held = self.paced and not outranks(ticket, granted) and (
            bool(granted) or ahead.charge_s > 0)
        entry_s = self.bucket.wait_s(self.charge_s(ticket), now,
                                     ahead_s=ahead.charge_s) if held else 0.0
        return predicted_ttft_s(
            waited_s=now - ticket.arrival_at,
            entry_s=entry_s,
            backlog_s=self.backlog(granted, ticket.level, now),
            ahead_service_s=self.calibration.overall * ahead.work_s,
            own_service_s=self.service_s(ticket),
            prep_s=self.prep.prep_s(ticket.vision_tokens))

    def predicted_at_grant(self, ticket: Ticket, now: float,
                           granted: Collection[Ticket]) -> float:
        return predicted_ttft_s(
            waited_s=now - ticket.arrival_at, entry_s=0.0,
            backlog_s=self.backlog(granted, ticket.level, now), ahead_service_s=0.0,
            own_service_s=self.service_s(ticket), prep_s=self.prep.prep_s(ticket.vision_tokens))

    # -- the work rate ------------------------------------------------------------------

    def slo_work_granted(self, granted: Collection[Ticket]) -> bool:
        """Whether a request with a TPOT target (not served late) is past the queue."""
        return any(not t.late and self._classes[t.class_name].tpot_target_s is not None
                   for t in granted)

    def pace_verdict(self, now: float, granted: Collection[Ticket]) -> bool:
        """Let the decode pace correct the work rate (once per interval); True if the scale
        moved."""
        if self.tpot_target is None or not self.slo_work_granted(granted):
            return False  # nothing whose TPOT is kept is decoding
        kept = self.pace.verdict(now, self.tpot_target)
        if kept is None:
            return False
        before = self.tpot_feedback.scale
        self.tpot_feedback.observe(kept)
        return self.tpot_feedback.scale != before

    def refresh_rate(self, now: float, granted: Collection[Ticket]) -> None:
        self.pace_verdict(now, granted)
        if self.model is not None:
            rate = self.model.max_work_rate(
                self.running, self.tpot_target, self._settings.slo_safety)
            self.bucket.set_rate(max(MIN_WORK_RATE, rate * self.tpot_feedback.scale), now)

    # -- a ticket's life ----------------------------------------------------------------

    def take(self, ticket: Ticket, now: float, take_work: bool) -> None:
        """At its grant: charge the bucket (unless unrationed late work)."""
        ticket.rationed = take_work and self.paced
        if ticket.rationed:
            ticket.charged_s = self.charge_s(ticket)
            self.bucket.take(ticket.charged_s, now)

    def reprice(self, ticket: Ticket, now: float) -> None:
        """Its rendered size is known: settle the difference with what its grant took."""
        self.price(ticket)
        if self.active and ticket.rationed:
            charge = self.charge_s(ticket)
            self.bucket.refund(ticket.charged_s - charge, now)
            ticket.charged_s = charge

    def refund_unspent(self, ticket: Ticket, now: float) -> None:
        """It never reached vLLM: what its grant took goes back to the bucket."""
        if self.active and ticket.rationed:
            self.bucket.refund(ticket.charged_s, now)

    def stats(self, granted: Collection[Ticket], top_level: int, now: float) -> SloStats:
        return SloStats(
            active=self.active, model=self.model, work_rate=self.bucket.rate,
            tpot_scale=self.tpot_feedback.scale, max_running=self.max_running(),
            calibration=self.calibration.overall,
            service_s_by_size=self.calibration.by_size(), prep_s_by_size=self.prep.by_size(),
            backlog_s=self.backlog(granted, top_level, now))
