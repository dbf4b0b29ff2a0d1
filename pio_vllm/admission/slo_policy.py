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
- the running requests' measured pace corrects that rate (`DecodePace` feeding
  `TpotFeedback`): it shrinks while more than a fifth of the recent windows miss the TPOT
  target and recovers while they keep it;
- a request's predicted TTFT is its wait so far, plus the longer of the time until the
  bucket lets it in (the work queued ahead of it and its own, less what the bucket holds,
  at that rate) and the engine's *backlog* (the admitted work of the same or higher
  priority not yet at its first token, less what the engine has already spent on it:
  `backlog_s`) plus the service time of the requests queued ahead, plus its own service
  time;
- a request's *service time* is learnt per size class from the requests served
  (`ServiceCalibration`, fed by `FirstTokenGroups`): the step model is linear, but a vision
  encoder's attention grows faster than linearly with an image's tokens, and a text-only
  request's first token also waits for a decode step the model prices at almost nothing.
  Measured on the tiny CPU model: text ~3x its modelled work, 300 vision tokens ~0.7x,
  1344 ~1.2x; one ratio for all sizes swung with whichever size finished last.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

MIN_WORK_RATE = 0.05  # engine-seconds of prefill per second: never close the door entirely


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
        return min(1.0, max(MIN_WORK_RATE, room))


class TpotFeedback:
    """Scales the work rate by whether decoding kept its TPOT target.

    The work rate above is priced from the step model, which misses some of what slows
    decoding: on a CPU the API server shares the cores with the engine, and the fit can
    find no per-token slope, so a larger decode batch looks free. Each verdict (one per
    `DecodePace` window) moves the scale: up by `up` when the pace kept the TPOT target,
    down by `up ** ((1 - b) / b)` when it missed, with `b = miss_budget`. The scale settles
    where about `miss_budget` of verdicts miss (a stochastic quantile tracker); when fewer
    miss it stays at 1, so an engine that is not overloaded is never slowed."""

    def __init__(self, miss_budget: float = 0.2, up: float = 1.05, floor: float = 0.05
                 ) -> None:
        if not 0 < miss_budget < 1:
            raise ValueError(f"miss_budget {miss_budget}: accepted: between 0 and 1")
        self.scale = 1.0
        self._up = up
        self._down = up ** -((1 - miss_budget) / miss_budget)
        self._floor = floor

    def observe(self, kept_target: bool) -> None:
        self.scale = min(1.0, max(self._floor,
                                  self.scale * (self._up if kept_target else self._down)))


class DecodePace:
    """The TPOT running requests get now: their mean inter-token time over the last
    `window_s`, from vLLM's per-step iteration stats (engine-core timestamps, cumulative
    totals), with one verdict per `interval_s` for `TpotFeedback`.

    Why not the finished requests' TPOT: a request finishes 1-10 s after it was admitted,
    so on a burst that feedback arrives after the damage (measured, mixed-resolution at 3x
    capacity: the admissions of the first 8 s ran at TPOT 55-126 ms, and once the misses
    came in the door stayed nearly shut while TPOT was ~20 ms). The pace reacts within a
    window. A window is request-weighted like TPOT itself: a step that stalls n running
    requests counts n times."""

    def __init__(self, window_s: float = 2.0, interval_s: float = 0.25,
                 min_tokens: int = 8) -> None:
        self._window_s = window_s
        self._interval_s = interval_s
        self._min_tokens = min_tokens
        self._points: collections.deque[tuple[float, float, int]] = collections.deque()
        self._next_verdict_at: float | None = None

    def record(self, now: float, itl_total_s: float, itl_count: int) -> None:
        """The cumulative inter-token seconds and count vLLM has reported so far."""
        if self._points and itl_count == self._points[-1][2]:
            return  # no decode token this step (prefill only, or idle)
        self._points.append((now, itl_total_s, itl_count))
        while len(self._points) > 2 and self._points[1][0] <= now - self._window_s:
            self._points.popleft()

    def mean_s(self, now: float) -> float | None:
        """Mean inter-token time over the window (None: fewer than `min_tokens`)."""
        start = now - self._window_s
        if not self._points or self._points[-1][0] < start:
            return None
        # the totals at the window's start: the latest point before it (else the oldest)
        base = self._points[0]
        for point in self._points:
            if point[0] > start:
                break
            base = point
        last = self._points[-1]
        tokens = last[2] - base[2]
        if tokens < self._min_tokens:
            return None
        return (last[1] - base[1]) / tokens

    def verdict(self, now: float, target_s: float) -> bool | None:
        """Once per interval: whether the window's pace kept `target_s` (True also when
        too few tokens were decoded to tell: nothing is decoding slowly); None between."""
        if self._next_verdict_at is not None and now < self._next_verdict_at:
            return None
        self._next_verdict_at = now + self._interval_s
        mean = self.mean_s(now)
        return mean is None or mean <= target_s


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

    def state(self) -> tuple[float, float]:
        """(level, time): what several API-server processes share (`node_ledger.py`)."""
        return self._level, self._at

    def restore(self, level: float, at: float) -> None:
        self._level, self._at = level, at

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

    def wait_s(self, work_s: float, now: float, ahead_s: float = 0.0) -> float:
        """Seconds until `work_s` fits, after `ahead_s` of work queued before it has
        entered (what the bucket holds now counts towards both)."""
        missing = ahead_s + min(work_s, self.capacity_s) - self.level(now)
        if missing <= 0:
            return 0.0
        return missing / self.rate if self.rate > 0 else math.inf


def size_class(vision_tokens: int) -> int:
    """Requests calibrated together: 0 for text only, else the bit length of the vision
    token count (64 -> 7, 300 -> 9, 1344 -> 11): sizes within a factor of two share a ratio."""
    return 0 if vision_tokens <= 0 else int(vision_tokens).bit_length()


class _LogRatio:
    """Exponentially weighted mean of log(actual / predicted), bounded per sample."""

    def __init__(self, smoothing: float, bounds: tuple[float, float]) -> None:
        self._log = 0.0
        self.samples = 0
        self._smoothing = smoothing
        self._bounds = bounds

    @property
    def ratio(self) -> float:
        return math.exp(self._log)

    def observe(self, ratio: float) -> None:
        observed = math.log(min(self._bounds[1], max(self._bounds[0], ratio)))
        # log space: ratios of 0.5 and 2 cancel out; the first sample sets it
        a = 1.0 if self.samples == 0 else self._smoothing
        self._log = (1 - a) * self._log + a * observed
        self.samples += 1


class ServiceCalibration:
    """A request's service time (from when the engine could start on it to its first
    token), learnt from the requests served: per size class, seconds per vision token (per
    request for text only), a running log-space mean; a size class without samples yet
    uses the step model's work times the ratio of actual to modelled time over all sizes.

    Per size class and in seconds rather than as one ratio to the step model: the fitted
    model moves as its window of steps does (a 1344-token image was priced anywhere from
    0.37 to 1.1 s within one run on the tiny CPU model while it took 1.1-1.3 s), and one
    ratio for all sizes swung with whichever size finished last."""

    def __init__(self, smoothing: float = 0.2, bounds: tuple[float, float] = (0.25, 8.0)
                 ) -> None:
        self._smoothing = smoothing
        self._bounds = bounds
        self._all = _LogRatio(smoothing, bounds)
        self._by_size: dict[int, _LogRatio] = {}

    @property
    def overall(self) -> float:
        """Actual over modelled service time, over all sizes (1.0 before any sample)."""
        return self._all.ratio

    @property
    def samples(self) -> int:
        return self._all.samples

    @staticmethod
    def _units(vision_tokens: int) -> int:
        return max(1, vision_tokens)

    def service_s(self, vision_tokens: int, work_s: float) -> float:
        """Predicted service time of a request with `vision_tokens` and modelled `work_s`.

        A size class without samples: an image takes the nearest image size's seconds per
        vision token (the smaller one if equally near), or the model's work before any
        image was served; text the model's work times the overall ratio. Not the overall
        ratio for an image: text dominates it (7.7x measured after a burst's first text
        requests, where the model prices text at almost nothing, against ~0.7-1.2x for
        images), which priced a burst's first 448x336 images at ~0.64 s each and shed
        interactive requests that were then served in 0.35 s."""
        key = size_class(vision_tokens)
        by_size = self._by_size.get(key)
        if by_size is None and key > 0:
            images = [k for k in self._by_size if k > 0]
            if not images:
                return work_s
            by_size = self._by_size[min(images, key=lambda k: (abs(k - key), k))]
        if by_size is None:
            return self._all.ratio * work_s
        return by_size.ratio * self._units(vision_tokens)

    def by_size(self) -> dict[int, float]:
        """{size class: seconds per vision token (text: per request)} measured so far."""
        return {k: v.ratio for k, v in sorted(self._by_size.items())}

    def observe(self, vision_tokens: int, work_s: float, actual_s: float) -> None:
        if work_s <= 0 or actual_s <= 0:
            return
        self._all.observe(actual_s / work_s)
        key = size_class(vision_tokens)
        if key not in self._by_size:
            # no bounds on the first sample's absolute seconds: it sets the class's value
            self._by_size[key] = _LogRatio(self._smoothing, (0.0, math.inf))
            self._by_size[key].observe(actual_s / self._units(vision_tokens))
            return
        # later samples are bounded relative to what the class has learnt (one outlier moves
        # it by at most a factor of bounds ** smoothing)
        current = self._by_size[key].ratio
        per_unit = actual_s / self._units(vision_tokens)
        per_unit = min(current * self._bounds[1], max(current * self._bounds[0], per_unit))
        self._by_size[key].observe(per_unit)


class PrepTimes:
    """Seconds from a request's grant to its hand-over to vLLM (in the server: vLLM's
    serving layer renders it and runs the HF image processor; in-process: pio's intake),
    learnt per size class as a running mean. The engine can start on a request only once
    it is prepared, and none of it is in the service time (which starts at the hand-over).
    Measured on the tiny CPU model in the server with an idle engine: text ~5 ms, a 224x224
    image ~50 ms, 640x480 ~100 ms; predictions without it were 40-60% short for those."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self._by_size: dict[int, float] = {}

    def observe(self, vision_tokens: int, seconds: float) -> None:
        key = size_class(vision_tokens)
        current = self._by_size.get(key)
        self._by_size[key] = seconds if current is None else (
            (1 - self._smoothing) * current + self._smoothing * seconds)

    def prep_s(self, vision_tokens: int) -> float:
        """The learnt time for this size (a size not seen yet: the nearest smaller one seen,
        else 0)."""
        key = size_class(vision_tokens)
        known = [k for k in self._by_size if k <= key]
        return self._by_size[max(known)] if known else 0.0

    def by_size(self) -> dict[int, float]:
        return dict(sorted(self._by_size.items()))


class FirstTokenGroups:
    """Turns first-token times into service times. Requests whose first tokens arrive within
    `same_step_s` of each other came out of one engine step, prefilled together: the group
    shares its time (from the latest earlier first token, or the group's first hand-over to
    vLLM if later) in proportion to the members' modelled work. A group is scored when the
    next one begins."""

    def __init__(self, calibration: ServiceCalibration, same_step_s: float = 0.005) -> None:
        self._calibration = calibration
        self._same_step_s = same_step_s
        self._group: list[tuple[int, float, float]] = []  # (vision tokens, work, started)
        self._group_at: float | None = None
        self._previous_at: float | None = None  # the first token before this group
        self.last_at: float | None = None  # the latest first token

    def first_token(self, now: float, started_at: float, vision_tokens: int,
                    work_s: float) -> None:
        if self._group_at is not None and now - self._group_at > self._same_step_s:
            self._score()
        if self._group_at is None:
            self._group_at = now
        self._group.append((vision_tokens, work_s, started_at))
        self.last_at = now

    def _score(self) -> None:
        assert self._group_at is not None
        started = min(s for _, _, s in self._group)
        could_start = started if self._previous_at is None else max(started, self._previous_at)
        span = self._group_at - could_start
        total = sum(w for _, w, _ in self._group)
        if span > 0 and total > 0:
            for vision, work, _ in self._group:
                self._calibration.observe(vision, work, span * work / total)
        self._previous_at = self._group_at
        self._group, self._group_at = [], None


def backlog_s(ahead_service_s: float, drain_started_at: float | None, now: float) -> float:
    """Engine seconds still to run before a newly admitted request's prefill can start:
    the service time of the admitted requests ahead of it that have no first token yet,
    less what the engine has spent on them since it began (`drain_started_at`: the later
    of the oldest one's hand-over to vLLM and the latest first token; None: none of them
    is in vLLM yet, nothing is spent)."""
    if drain_started_at is None:
        return ahead_service_s
    return max(0.0, ahead_service_s - max(0.0, now - drain_started_at))


def predicted_ttft_s(*, waited_s: float, entry_s: float, backlog_s: float,
                     ahead_service_s: float, own_service_s: float, prep_s: float = 0.0
                     ) -> float:
    """TTFT of a queued request: its wait so far; then whichever takes longer of the time
    until the work bucket lets it in (`WorkBucket.wait_s` with the work queued ahead of it)
    plus its preparation (`PrepTimes`) and the engine's backlog plus the service time of
    the requests queued ahead of it (the engine works through the backlog while the bucket
    refills and the request is prepared); then its own service time."""
    return waited_s + max(entry_s + prep_s, backlog_s + ahead_service_s) + own_service_s
