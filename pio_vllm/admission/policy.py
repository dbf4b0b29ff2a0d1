"""Admission policy: ordering, aging and shedding (pure code, any process).

Numbers in, decisions out; no asyncio, no vLLM, no wall clock (every function takes `now`).
The controller in `controller.py` applies these decisions to live requests.

Priority follows vLLM: a lower level is served first. Aging lowers a waiting request's
effective level by `weight / aging_s_per_level` per second of waiting, so a batch request
(level 2, weight 1) that waited 2 * aging_s ties with a fresh interactive one (level 0):
no class starves, and classes with a higher weight catch up faster.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


class ShedReason(enum.Enum):
    """Why a request was refused at once."""

    QUEUE_FULL = "queue_full"
    DEADLINE_INFEASIBLE = "deadline_infeasible"
    SLO_INFEASIBLE = "slo_infeasible"  # predicted to miss its class's TTFT target


@dataclass(frozen=True)
class WaitingView:
    """What the policy needs to know about a queued request."""

    key: int  # unique, increasing with arrival (ties are broken by it: FIFO)
    level: int
    weight: float
    arrival_at: float  # when it entered pio's queue


@dataclass(frozen=True)
class AdmissionPolicy:
    """Tunable knobs of ordering and aging."""

    aging_s_per_level: float = 10.0  # seconds of waiting (at weight 1) worth one level

    def effective_level(self, item: WaitingView, now: float) -> float:
        waited_s = max(0.0, now - item.arrival_at)
        if self.aging_s_per_level <= 0 or math.isinf(self.aging_s_per_level):
            return float(item.level)
        return item.level - waited_s * item.weight / self.aging_s_per_level

    def order(self, waiting: Iterable[WaitingView], now: float) -> list[WaitingView]:
        """Waiting requests in the order they should be admitted: by effective level, then
        by arrival."""
        return sorted(waiting, key=lambda w: (self.effective_level(w, now), w.arrival_at, w.key))


class RateMeter:
    """Completions per second over a sliding window of recent completions."""

    def __init__(self, window: int = 64, min_samples: int = 8) -> None:
        self._times: deque[float] = deque(maxlen=window)
        self._min_samples = min_samples

    def record(self, now: float) -> None:
        self._times.append(now)

    def rate(self, now: float) -> float | None:
        """Completions per second, or None until enough samples exist."""
        if len(self._times) < self._min_samples:
            return None
        span = max(now, self._times[-1]) - self._times[0]
        if span <= 0:
            return None
        return (len(self._times) - 1) / span


def estimated_wait_s(ahead: int, free_slots: int, rate_per_s: float | None) -> float | None:
    """Expected time before a request with `ahead` requests before it gets a slot."""
    if ahead < free_slots:
        return 0.0
    if rate_per_s is None or rate_per_s <= 0:
        return None
    return (ahead - free_slots + 1) / rate_per_s


def shed_decision(
    *,
    queue_len: int,
    max_queue_len: int,
    ahead: int,
    free_slots: int,
    rate_per_s: float | None,
    deadline_in_s: float | None,
) -> tuple[ShedReason, float] | None:
    """(reason, retry_after_s) when a new request must be refused at once, else None."""
    wait = estimated_wait_s(ahead, free_slots, rate_per_s)
    if queue_len >= max_queue_len:
        drain = 1.0 if rate_per_s is None or rate_per_s <= 0 else max(1, ahead) / rate_per_s
        return ShedReason.QUEUE_FULL, max(0.1, drain)
    if deadline_in_s is not None and wait is not None and wait > deadline_in_s:
        return ShedReason.DEADLINE_INFEASIBLE, max(0.1, wait - deadline_in_s)
    return None
