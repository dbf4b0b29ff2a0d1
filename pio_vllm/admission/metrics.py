"""Per-class admission metrics: counters, gauges, histograms (frontend process, pure Python).

Each priority class gets: queued, preparing and running gauges (running: past pio's queue,
preparing or in vLLM); admitted, completed, failed, cancelled, shed, expired and preempted
counters;
queue-wait and TTFT histograms. `snapshot()` returns
frozen stats with p50/p99 over recent samples; `PrometheusExporter` mirrors the same numbers
into a prometheus_client registry (names prefixed `pio_`, beside vLLM's `vllm:` metrics).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Buckets for queue wait and TTFT (seconds): ~1 engine step on a GPU up to a minute.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Buckets for actual / predicted TTFT (a ratio, no unit).
RATIO_BUCKETS = (0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


class Event(enum.Enum):
    """Counted admission events."""

    ADMITTED = "admitted"
    DEFERRED = "deferred"  # had to wait in the queue (not admitted on arrival)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SHED = "shed"
    # predicted to miss its TTFT target, kept to be served late (class infeasible: serve_late)
    LATE = "late"
    EXPIRED = "expired"
    PREEMPTED = "preempted"  # by pio's scheduler inside vLLM (counted when a request ends)
    SLO_MET = "slo_met"  # finished within its class's TTFT and TPOT targets
    SLO_MISSED = "slo_missed"  # finished, but missed a target


def percentile(samples: Iterable[float], q: float) -> float | None:
    """The q-th percentile of `samples` by linear interpolation (numpy's default, the method
    vLLM's benchmark client reports), or None when there are none."""
    values = list(samples)
    if not values:
        return None
    return float(np.percentile(values, q))


@dataclass(frozen=True)
class ClassStats:
    """One class's numbers at a point in time (counters are totals since start)."""

    queued: int
    preparing: int
    running: int
    admitted: int
    deferred: int
    completed: int
    failed: int
    cancelled: int
    shed: int
    late: int  # predicted to miss its TTFT target, served late (infeasible: serve_late)
    expired: int
    preempted: int
    slo_met: int
    slo_missed: int
    ttft_prediction_error_p50: float | None  # |predicted - actual| / actual, median
    queue_wait_p50_s: float | None
    queue_wait_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None


@dataclass
class _ClassCounters:
    queued: int = 0
    preparing: int = 0
    running: int = 0
    events: dict[Event, int] = field(default_factory=lambda: {e: 0 for e in Event})
    queue_wait_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    prediction_error: deque[float] = field(default_factory=lambda: deque(maxlen=2048))


class PrometheusExporter:
    """Prometheus collectors for the admission metrics, in `registry`."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # Gauges sum over live API-server processes under `--api-server-count N` (vLLM's
        # multi-process Prometheus mode; the mode is ignored in one process).
        self.events = Counter(
            "pio_admission_events", "Admission events per priority class",
            ["priority_class", "event"], registry=registry)
        self.queued = Gauge(
            "pio_queued_requests", "Requests waiting in pio's queue", ["priority_class"],
            registry=registry, multiprocess_mode="livesum")
        self.queue_depth = Gauge(
            "pio_queue_depth", "Requests waiting in pio's queue, all classes",
            registry=registry, multiprocess_mode="livesum")
        self.preparing = Gauge(
            "pio_preparing_requests", "Requests past pio's queue being rendered / decoded",
            ["priority_class"], registry=registry, multiprocess_mode="livesum")
        self.running = Gauge(
            "pio_running_requests", "Requests past pio's queue (preparing or in vLLM)",
            ["priority_class"], registry=registry, multiprocess_mode="livesum")
        self.queue_wait = Histogram(
            "pio_queue_wait_seconds", "Time from arrival to admission into vLLM",
            ["priority_class"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.ttft = Histogram(
            "pio_time_to_first_token_seconds", "Time from arrival to the first output token",
            ["priority_class"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.predicted_ttft = Histogram(
            "pio_predicted_time_to_first_token_seconds",
            "TTFT that SLO admission predicted when it let the request in",
            ["priority_class"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.ttft_ratio = Histogram(
            "pio_ttft_actual_over_predicted", "Actual TTFT divided by SLO admission's "
            "prediction (a ratio)", ["priority_class"], buckets=RATIO_BUCKETS,
            registry=registry)


class AdmissionMetrics:
    """Per-class counters; optionally exported to Prometheus."""

    def __init__(self, class_names: list[str], registry: Any | None = None) -> None:
        self._classes: dict[str, _ClassCounters] = {n: _ClassCounters() for n in class_names}
        self._prom = PrometheusExporter(registry) if registry is not None else None
        self._held_listeners: list[Callable[[], None]] = []

    def _get(self, cls: str) -> _ClassCounters:
        return self._classes[cls]  # configured classes only: a bounded label set

    def count(self, cls: str, event: Event, n: int = 1) -> None:
        self._get(cls).events[event] += n
        if self._prom is not None:
            self._prom.events.labels(cls, event.value).inc(n)

    def on_held_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever the queued or preparing count of a class changes
        (keep it short: it runs inside admission's decisions)."""
        self._held_listeners.append(listener)

    def add_queued(self, cls: str, delta: int) -> None:
        c = self._get(cls)
        c.queued += delta
        if self._prom is not None:
            self._prom.queued.labels(cls).set(c.queued)
            self._prom.queue_depth.inc(delta)
        for listener in self._held_listeners:
            listener()

    def add_preparing(self, cls: str, delta: int) -> None:
        c = self._get(cls)
        c.preparing += delta
        if self._prom is not None:
            self._prom.preparing.labels(cls).set(c.preparing)
        for listener in self._held_listeners:
            listener()

    def add_running(self, cls: str, delta: int) -> None:
        c = self._get(cls)
        c.running += delta
        if self._prom is not None:
            self._prom.running.labels(cls).set(c.running)

    def observe_queue_wait(self, cls: str, seconds: float) -> None:
        self._get(cls).queue_wait_s.append(seconds)
        if self._prom is not None:
            self._prom.queue_wait.labels(cls).observe(seconds)

    def observe_ttft(self, cls: str, seconds: float) -> None:
        self._get(cls).ttft_s.append(seconds)
        if self._prom is not None:
            self._prom.ttft.labels(cls).observe(seconds)

    def observe_prediction(self, cls: str, predicted_s: float, actual_s: float) -> None:
        if actual_s <= 0:
            return
        self._get(cls).prediction_error.append(abs(predicted_s - actual_s) / actual_s)
        if self._prom is not None:
            self._prom.predicted_ttft.labels(cls).observe(predicted_s)
            if predicted_s > 0:
                self._prom.ttft_ratio.labels(cls).observe(actual_s / predicted_s)

    def snapshot(self) -> dict[str, ClassStats]:
        out = {}
        for name, c in self._classes.items():
            e = c.events
            out[name] = ClassStats(
                queued=c.queued, preparing=c.preparing, running=c.running,
                admitted=e[Event.ADMITTED], deferred=e[Event.DEFERRED],
                completed=e[Event.COMPLETED],
                failed=e[Event.FAILED], cancelled=e[Event.CANCELLED], shed=e[Event.SHED],
                late=e[Event.LATE],
                expired=e[Event.EXPIRED], preempted=e[Event.PREEMPTED],
                slo_met=e[Event.SLO_MET], slo_missed=e[Event.SLO_MISSED],
                ttft_prediction_error_p50=percentile(c.prediction_error, 50),
                queue_wait_p50_s=percentile(c.queue_wait_s, 50),
                queue_wait_p99_s=percentile(c.queue_wait_s, 99),
                ttft_p50_s=percentile(c.ttft_s, 50),
                ttft_p99_s=percentile(c.ttft_s, 99),
            )
        return out
