"""Figures of a simulated (or replayed) run, in the shape `pio-vllm simulate` and
`pio-vllm bench replay` both write (pure code).

Goodput counts requests that met their class's SLO (TTFT and TPOT targets) plus served
requests of classes without one; `goodput_req_s` divides them by the trace's span (first to
last arrival; for a burst, the run's own length), `goodput_req_per_wall_s` by the side's run
(as the A/B benchmarks report it). Refused, expired and failed requests count as not served.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pio_vllm.admission.metrics import percentile


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None
    tpot_s: float | None

    def met(self, ok: bool, ttft_s: float | None, tpot_s: float | None) -> bool:
        if not ok:
            return False
        if self.ttft_s is not None and (ttft_s is None or ttft_s > self.ttft_s):
            return False
        return not (self.tpot_s is not None and tpot_s is not None and tpot_s > self.tpot_s)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def outcome_rows(outcomes: Sequence[Any]) -> list[dict[str, Any]]:
    """A simulation's request outcomes as the rows `summarise` reads."""
    return [{"class": o.priority_class, "ok": o.ok, "refused": o.refused, "expired": o.expired,
             "ttft_s": o.ttft_s, "tpot_s": o.tpot_s} for o in outcomes]


def summarise(rows: Sequence[Mapping[str, Any]], slos: Mapping[str, Slo], span_s: float,
              wall_s: float) -> dict[str, Any]:
    """`rows`: per request `class`, `ok`, `refused`, `expired`, `ttft_s`, `tpot_s`."""
    def figures(of: Sequence[Mapping[str, Any]], span: float, wall: float) -> dict[str, Any]:
        served = [r for r in of if r["ok"]]
        met = sum(1 for r in of if slos.get(r["class"], Slo(None, None)).met(
            r["ok"], r["ttft_s"], r["tpot_s"]))
        ttfts = [r["ttft_s"] for r in served if r["ttft_s"] is not None]
        return {
            "requests": len(of), "served": len(served),
            "refused": sum(1 for r in of if r.get("refused")),
            "expired": sum(1 for r in of if r.get("expired")),
            "failed": sum(1 for r in of if not r["ok"] and not r.get("refused")
                          and not r.get("expired")),
            "met_slo": met,
            "goodput_req_s": _r(met / span) if span > 0 else None,
            "goodput_req_per_wall_s": _r(met / wall) if wall > 0 else None,
            "ttft_p50_s": _r(percentile(ttfts, 50)),
            "ttft_p99_s": _r(percentile(ttfts, 99)),
            "tpot_p50_s": _r(percentile([r["tpot_s"] for r in served
                                         if r["tpot_s"] is not None], 50)),
        }

    span = span_s if span_s > 0 else wall_s
    out = figures(rows, span, wall_s)
    out["wall_s"] = _r(wall_s)
    out["classes"] = {cls: figures([r for r in rows if r["class"] == cls], span, wall_s)
                      for cls in sorted({r["class"] for r in rows})}
    return out


def class_slos(settings: Any, override: tuple[float, float] | None = None) -> dict[str, Slo]:
    """Each class's SLO: its targets, or one TTFT/TPOT pair for every class."""
    if override is not None:
        return {name: Slo(*override) for name in settings.priority_classes}
    return {name: Slo(c.ttft_target_s, c.tpot_target_s)
            for name, c in settings.priority_classes.items()}
