"""benchmarks/mixed_resolution.py's account of the requests pio did not serve."""

from __future__ import annotations

from typing import Any

from benchmarks.mixed_resolution import SLO, not_served_by_pio


def _row(rid: str, ok: bool, ttft_s: float | None = None,
         tpot_s: float | None = None) -> dict[str, Any]:
    return {"request_id": rid, "ok": ok, "ttft_s": ttft_s, "tpot_s": tpot_s}


def test_requests_pio_refused_are_sorted_by_what_plain_made_of_them() -> None:
    plain = {"rows": [_row("met", True, SLO.ttft_s, SLO.tpot_s),
                      _row("late", True, SLO.ttft_s + 0.01, 0.01),
                      _row("slow", True, 0.5, SLO.tpot_s + 0.001),
                      _row("lost", False),
                      _row("served-by-both", True, 0.1, 0.01)]}
    pio = {"rows": [_row("met", False), _row("late", False), _row("slow", False),
                    _row("lost", False), _row("served-by-both", True, 0.1, 0.01)]}
    assert not_served_by_pio(plain, pio) == {
        "requests": 4, "plain_met_slo": 1, "plain_missed_slo": 2, "plain_not_served": 1}


def test_without_per_request_rows_there_is_no_account() -> None:
    assert not_served_by_pio({"rows": []}, {"rows": [_row("a", False)]}) is None
    assert not_served_by_pio({"rows": [_row("a", True, 0.1)]}, {}) is None
