"""SLO policy: what a request costs the engine in seconds, how fast such work may enter it,
and when a request would start (pure code, any process; every function takes `now`).

The engine's step time is fitted online from the scheduler's own step records
(`tuning/batch_tuner.py`, StepModel): `base + per_token * tokens + per_vision * vision`.
From it:

- a request's *work* is what its prefill adds to the engine's time before its first
  token: `base + per_token * prompt_tokens + per_vision * vision_tokens` (on a CPU the vision
  encoder dominates: a 1344x1008 image is ~0.6 s that stalls every running request);
- the *work rate* keeps running requests within their TPOT target: decode steps of n
  running requests take `d(n) = base + per_token * n`; if prefill work takes a fraction rho
  of the engine's time, a running request's TPOT is about `d(n) / (1 - rho)`, so work may
  enter at `rho_max = 1 - d(n) / (tpot_target * safety)` engine-seconds per second, with
  a burst of `burst_s` (one large image always fits when nothing else is pending);
- a request's predicted TTFT is its wait so far, plus the work queued ahead of it at that
  rate, plus the work already admitted and not yet started (same or higher priority: vLLM
  serves those first), plus its own work; a running ratio of actual to predicted engine
  time (`TtftCalibration`) corrects what the linear model misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkModel:
    """Engine seconds per step, fitted: base + per_token * tokens + per_vision * vision."""

    base_s: float
    per_token_s: float
    per_vision_token_s: float

    def work_s(self, prompt_tokens: int, vision_tokens: int) -> float:
        """Engine time a request's prefill (and image encoding) adds before its first
        token. Prompt tokens include the vision tokens (vLLM counts them so)."""
        return (self.base_s + self.per_token_s * prompt_tokens
                + self.per_vision_token_s * vision_tokens)

    def decode_step_s(self, running: int) -> float:
        return self.base_s + self.per_token_s * running

    def max_work_rate(self, running: int, tpot_target_s: float | None,
                      safety: float = 0.8) -> float:
        """Engine-seconds of prefill work per second that keep decoding within the TPOT
        target (1.0: no TPOT target, the engine may spend all its time on prefills)."""
        if tpot_target_s is None:
            return 1.0
        room = 1.0 - self.decode_step_s(running) / (tpot_target_s * safety)
        return min(1.0, max(0.05, room))  # never close the door entirely


class WorkBucket:
    """A token bucket of engine-seconds: refills at `rate` per second up to `capacity`."""

    def __init__(self, capacity_s: float, now: float) -> None:
        self.capacity_s = capacity_s
        self.rate = 1.0
        self._level = capacity_s
        self._at = now

    def level(self, now: float) -> float:
        self._level = min(self.capacity_s, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def set_rate(self, rate: float, now: float) -> None:
        self.level(now)
        self.rate = rate

    def fits(self, work_s: float, now: float) -> bool:
        """Whether `work_s` may enter now (a request larger than the bucket enters once the
        bucket is full, so nothing is held back forever)."""
        level = self.level(now)
        return level >= min(work_s, self.capacity_s) - 1e-9

    def take(self, work_s: float, now: float) -> None:
        self.level(now)
        self._level -= work_s  # may go negative: a large request borrows from the future

    def refund(self, work_s: float, now: float) -> None:
        """Give back work that did not enter the engine after all (negative: take more)."""
        self._level = min(self.capacity_s, self.level(now) + work_s)

    def wait_s(self, work_s: float, now: float) -> float:
        """Seconds until `work_s` fits."""
        missing = min(work_s, self.capacity_s) - self.level(now)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


class TtftCalibration:
    """Running ratio of actual to predicted engine time (grant -> first token)."""

    def __init__(self, smoothing: float = 0.2, bounds: tuple[float, float] = (0.25, 8.0)
                 ) -> None:
        self.ratio = 1.0
        self.samples = 0
        self._smoothing = smoothing
        self._bounds = bounds

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if predicted_s <= 0 or actual_s <= 0:
            return
        observed = min(self._bounds[1], max(self._bounds[0], actual_s / predicted_s))
        # log-space average: ratios of 0.5 and 2 cancel out
        a = 1.0 if self.samples == 0 else self._smoothing
        self.ratio = math.exp((1 - a) * math.log(self.ratio) + a * math.log(observed))
        self.samples += 1


def predicted_ttft_s(*, waited_s: float, queued_ahead_work_s: float, rate: float,
                     admitted_work_s: float, own_work_s: float, calibration: float) -> float:
    """TTFT of a queued request: its wait so far, the time for the work queued ahead of it
    to enter at `rate`, then the engine time for admitted work plus its own."""
    entry_s = queued_ahead_work_s / rate if rate > 0 else math.inf
    return waited_s + entry_s + calibration * (admitted_work_s + own_work_s)
