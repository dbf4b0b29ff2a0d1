"""The A/B protocol every scenario records with: rounds, intervals over rounds, verdicts.

- A round runs every side once on the same seeded workload, each side in a fresh process
  (in-process mode) or against a fresh server, in an order drawn from the round's own seed
  (`round_order`; recorded in the result), so neither side always runs first on a machine
  that warms up or drifts (Abedi & Brecht, ICPE 2017: non-interleaved runs reported a 38%
  difference between two identical systems).
- A scenario computes its figures inside each round (a ratio compares the two sides of the
  same round), then summarises each by its median over rounds and a 95% bootstrap interval
  that resamples rounds, not requests: requests of one run are correlated through the queue,
  rounds are not. The bootstrap is scipy's (`scipy.stats.bootstrap`, percentile method,
  seeded), so the same rounds give the same interval.
- A target is one of three kinds, and its verdict follows from the interval:
  `GAIN` (pio must beat a factor): met when the interval's lower bound clears it;
  `NO_HARM` (pio must not lose more than a factor): met when the median clears it and the
  lower bound is at least 0.9; `AT_MOST` (a cost or an error that must stay under a
  bound): met when the interval's upper bound is under it. Fewer than `MIN_ROUNDS` rounds
  decide nothing (`met` false): one or two runs on this machine move by up to 2x.

A verdict is a JSON object with exactly the keys `name`, `target`, `median`, `ci95`,
`rounds`, `met`; a scenario's result keeps them in its top-level `verdicts` list.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

MIN_ROUNDS = 3
NO_HARM_FLOOR = 0.9  # a no-harm target's lower bound must stay at or above this
CONFIDENCE = 0.95
RESAMPLES = 9999


class Kind(Enum):
    """How a target's interval decides it (module docstring)."""

    GAIN = "gain"
    NO_HARM = "no_harm"
    AT_MOST = "at_most"


@dataclass(frozen=True)
class Target:
    """One decided target of a scenario: `figure` names the per-round figure it judges."""

    name: str
    figure: str
    kind: Kind
    threshold: float
    text: str


@dataclass(frozen=True)
class Interval:
    median: float
    lo: float
    hi: float


def round_order(seed: int, round_index: int, sides: Sequence[str]) -> list[str]:
    """The order the sides run in, in round `round_index` of a record seeded `seed`."""
    order = list(sides)
    random.Random(f"{seed}:{round_index}").shuffle(order)
    return order


def interval(values: Sequence[float], seed: int = 0) -> Interval | None:
    """Median of `values` (one per round) and its 95% bootstrap interval over rounds; None
    without values. With a single value, or all values equal, the interval is that value."""
    finite = [float(v) for v in values]
    if not finite:
        return None
    median = _median(finite)
    if len(finite) < 2 or min(finite) == max(finite):
        return Interval(median, min(finite), max(finite))
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap((np.asarray(finite),), np.median, confidence_level=CONFIDENCE,
                       n_resamples=RESAMPLES, method="percentile",
                       rng=np.random.default_rng(seed))
    lo, hi = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Interval(median, min(lo, median), max(hi, median))


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def decide(target: Target, iv: Interval | None, rounds: int) -> bool:
    """Whether `target` is met by the interval of `rounds` rounds (module docstring)."""
    if iv is None or rounds < MIN_ROUNDS:
        return False
    if target.kind is Kind.GAIN:
        return iv.lo >= target.threshold
    if target.kind is Kind.NO_HARM:
        return iv.median >= target.threshold and iv.lo >= NO_HARM_FLOOR
    return iv.hi <= target.threshold


def verdict(target: Target, per_round: Sequence[float | None], seed: int = 0
            ) -> dict[str, Any]:
    """The verdict object of `target` from its figure's value in each round (a round where
    the figure is undefined, None, is left out and not counted)."""
    values = [v for v in per_round if v is not None and not math.isnan(v)]
    iv = interval(values, seed)
    return {
        "name": target.name,
        "target": target.text,
        "median": None if iv is None else round(iv.median, 4),
        "ci95": None if iv is None else [round(iv.lo, 4), round(iv.hi, 4)],
        "rounds": len(values),
        "met": decide(target, iv, len(values)),
    }


def verdicts(targets: Sequence[Target], figures: Sequence[dict[str, float | None]],
             seed: int = 0) -> list[dict[str, Any]]:
    """Every target's verdict; `figures` holds each round's figures by name."""
    return [verdict(t, [f.get(t.figure) for f in figures], seed) for t in targets]


def summaries(figures: Sequence[dict[str, float | None]], seed: int = 0
              ) -> dict[str, dict[str, Any]]:
    """Median and interval of every figure, with its per-round values (for tables/plots)."""
    names = list(dict.fromkeys(name for f in figures for name in f))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        per_round = [f.get(name) for f in figures]
        iv = interval([v for v in per_round if v is not None], seed)
        out[name] = {"per_round": per_round,
                     "median": None if iv is None else round(iv.median, 4),
                     "ci95": None if iv is None else [round(iv.lo, 4), round(iv.hi, 4)]}
    return out


def interval_text(summary: dict[str, Any] | None, unit: str = "x") -> str:
    """`1.25x [1.10, 1.40]` for a table (`-` without a value)."""
    if not summary or summary.get("median") is None:
        return "-"
    lo, hi = summary["ci95"]
    return f"{summary['median']:g}{unit} [{lo:g}, {hi:g}]"


def verdict_lines(items: Sequence[dict[str, Any]]) -> list[str]:
    """A markdown table of verdicts."""
    lines = ["| target | median | 95% interval | rounds | met |", "|---|---|---|---|---|"]
    for v in items:
        ci = "-" if v["ci95"] is None else f"[{v['ci95'][0]:g}, {v['ci95'][1]:g}]"
        median = "-" if v["median"] is None else f"{v['median']:g}"
        lines.append(f"| {v['target']} | {median} | {ci} | {v['rounds']} | "
                     f"{'met' if v['met'] else '**not met**'} |")
    return lines


def floor_ratio(a: float | None, b: float | None, floor: float) -> float | None:
    """a / max(b, floor): a ratio that stays finite where the base side served nothing
    (`floor`: one request over the run, the least a side that served any could have)."""
    if a is None or b is None:
        return None
    return round(a / max(b, floor), 4)


FigureFn = Callable[[dict[str, dict[str, Any]]], dict[str, float | None]]
