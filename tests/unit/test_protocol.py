"""The A/B protocol (benchmarks/protocol.py) and the per-request accounting of refusals
(benchmarks/ab.py): side orders, intervals over rounds, the verdict rules."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.ab import lost_goodput
from benchmarks.harness import Slo
from benchmarks.protocol import (
    MIN_ROUNDS,
    Kind,
    Target,
    floor_ratio,
    interval,
    round_order,
    verdict,
    verdicts,
)

SLO = Slo(ttft_s=3.0, tpot_s=0.06)


def test_side_orders_are_drawn_per_round_and_reproducible() -> None:
    orders = [round_order(7, i, ["plain", "pio"]) for i in range(20)]
    assert orders == [round_order(7, i, ["plain", "pio"]) for i in range(20)]
    assert {tuple(o) for o in orders} == {("plain", "pio"), ("pio", "plain")}
    assert orders != [round_order(8, i, ["plain", "pio"]) for i in range(20)]


def test_the_interval_resamples_rounds_around_the_median() -> None:
    values = [1.1, 1.3, 0.9, 1.2, 1.25]
    iv = interval(values, seed=3)
    assert iv is not None and iv.median == 1.2
    assert min(values) <= iv.lo <= iv.median <= iv.hi <= max(values)
    assert iv == interval(values, seed=3)  # seeded: the same rounds give the same interval
    assert interval([], seed=0) is None
    one = interval([2.0], seed=0)
    assert one is not None and (one.lo, one.median, one.hi) == (2.0, 2.0, 2.0)


def test_wider_spread_gives_a_wider_interval() -> None:
    tight = interval([1.0, 1.01, 0.99, 1.0, 1.02], seed=0)
    loose = interval([0.5, 1.5, 0.7, 1.3, 1.0], seed=0)
    assert tight is not None and loose is not None
    assert loose.hi - loose.lo > 10 * (tight.hi - tight.lo)


@pytest.mark.parametrize(("kind", "values", "met"), [
    (Kind.GAIN, [12, 13, 15, 14, 16], True),  # every resample's median clears 10
    # with 5 rounds, 3 draws of the lowest round happen in 5.8% of resamples (> 2.5%):
    # the lower bound is the lowest round, and one low round decides
    (Kind.GAIN, [8, 13, 15, 14, 16], False),
    (Kind.GAIN, [8, 11, 15, 14, 16, 13, 12, 15, 14], True),  # 9 rounds: one may fall short
    (Kind.AT_MOST, [2, 3, 3.5, 2.5, 3], True),
    (Kind.AT_MOST, [2, 3, 3.5, 4.5, 5], False),
])
def test_gain_and_bound_targets_are_judged_on_the_interval(
        kind: Kind, values: list[float], met: bool) -> None:
    threshold = 10.0 if kind is Kind.GAIN else 4.0
    v = verdict(Target("t", "f", kind, threshold, "text"), values, seed=1)
    assert v["met"] is met, v


def test_no_harm_needs_the_median_over_the_target_and_the_lower_bound_over_0_9() -> None:
    target = Target("no harm", "f", Kind.NO_HARM, 0.97, "text")
    assert verdict(target, [0.98, 1.0, 0.99, 1.02, 0.97], seed=0)["met"]
    assert not verdict(target, [0.95, 0.96, 0.96, 0.99, 0.94], seed=0)["met"]  # median
    assert not verdict(target, [0.5, 1.0, 0.99, 1.02, 0.6], seed=0)["met"]  # lower bound


def test_too_few_rounds_decide_nothing() -> None:
    target = Target("gain", "f", Kind.GAIN, 1.0, "text")
    v = verdict(target, [5.0] * (MIN_ROUNDS - 1), seed=0)
    assert v["rounds"] == MIN_ROUNDS - 1 and not v["met"]
    assert verdict(target, [5.0] * MIN_ROUNDS, seed=0)["met"]


def test_a_verdict_has_exactly_the_recorded_keys_and_skips_undefined_rounds() -> None:
    [v] = verdicts([Target("gain", "ratio", Kind.GAIN, 1.0, "ratio >= 1x")],
                   [{"ratio": 2.0}, {"ratio": None}, {"ratio": 3.0}, {"ratio": 2.5}],
                   seed=0)
    assert set(v) == {"name", "target", "median", "ci95", "rounds", "met"}
    assert v["rounds"] == 3 and v["median"] == 2.5 and v["target"] == "ratio >= 1x"
    assert v["ci95"][0] <= 2.5 <= v["ci95"][1]


def test_a_ratio_against_a_side_that_served_nothing_stays_finite() -> None:
    assert floor_ratio(4.0, 0.0, 0.1) == 40.0
    assert floor_ratio(4.0, 2.0, 0.1) == 2.0
    assert floor_ratio(None, 2.0, 0.1) is None


def _row(rid: str, ok: bool, ttft_s: float | None = None,
         tpot_s: float | None = None) -> dict[str, Any]:
    return {"id": rid, "ok": ok, "ttft_s": ttft_s, "tpot_s": tpot_s}


def test_requests_pio_did_not_serve_are_sorted_by_what_plain_made_of_them() -> None:
    plain = {"requests_detail": [_row("met", True, SLO.ttft_s, SLO.tpot_s),
                                 _row("late", True, SLO.ttft_s + 0.01, 0.01),
                                 _row("slow", True, 0.5, SLO.tpot_s + 0.001),
                                 _row("lost", False),
                                 _row("served-by-both", True, 0.1, 0.01)]}
    pio = {"requests_detail": [_row("met", False), _row("late", False), _row("slow", False),
                               _row("lost", False), _row("served-by-both", True, 0.1, 0.01)]}
    assert lost_goodput(plain, pio, SLO) == {
        "offered": 5, "not_served": 4, "plain_met_slo": 1, "plain_missed_slo": 2,
        "plain_not_served": 1}


def test_without_per_request_outcomes_there_is_no_account() -> None:
    assert lost_goodput({"requests_detail": []}, {"requests_detail": [_row("a", False)]},
                        SLO) is None


def test_a_record_names_the_command_that_reproduces_it() -> None:
    from benchmarks.ab import command_line

    assert command_line("overhead", ["overhead", "--mode", "server", "--rounds", "5",
                                     "--out", "/tmp/x.json"]) == (
        "pio-vllm bench overhead --mode server --rounds 5")
