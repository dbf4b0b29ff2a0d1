"""SLO admission with a fake clock and a fake engine (no vLLM): work pricing, the TPOT work
rate, refusal of requests predicted to miss their TTFT target, cheap-first ordering,
calibration and the SLO metrics."""

from __future__ import annotations

import asyncio
import math

import pytest

from pio_vllm.admission.controller import AdmissionController, Release
from pio_vllm.admission.slo_policy import (
    TtftCalibration,
    WorkBucket,
    WorkModel,
    predicted_ttft_s,
)
from pio_vllm.errors import RequestRejectedError
from pio_vllm.settings import AdmissionSettings, PriorityClass
from tests.unit.test_admission_policy import FakeClock, FakeEngine, settle

# The CPU's shape: a 1344-token image is ~0.6 s of encoder work, text costs nearly nothing.
MODEL = WorkModel(base_s=0.004, per_token_s=0.0001, per_vision_token_s=0.00045)
SLO = {
    "interactive": PriorityClass(level=0, max_queue_len=64, weight=4.0, ttft_target_s=1.0,
                                 tpot_target_s=0.06),
    "standard": PriorityClass(level=1, max_queue_len=64, weight=2.0, ttft_target_s=3.0,
                              tpot_target_s=0.06),
    "batch": PriorityClass(level=2, max_queue_len=64, weight=1.0),
}
LEVELS = {n: c.level for n, c in SLO.items()}


def slo_controller(clock: FakeClock, capacity: int = 64, **kw: object) -> AdmissionController:
    settings = AdmissionSettings(**{"max_preparing": 64, **kw})  # type: ignore[arg-type]
    ctl = AdmissionController(settings, SLO, "standard", capacity, clock=clock)
    ctl.set_work_model(MODEL)
    return ctl


def submit(ctl: AdmissionController, eng: FakeEngine, rid: str, cls: str,
           vision: int = 0, text: int = 20) -> object:
    ticket = ctl.ticket(rid, LEVELS[cls], cls, None, prompt_tokens=text + vision,
                        vision_tokens=vision)
    eng.tasks[rid] = asyncio.create_task(eng._admit(ticket))
    return ticket


def test_work_model_prices_images_and_bounds_the_work_rate() -> None:
    assert MODEL.work_s(1364, 1344) == pytest.approx(0.004 + 0.1364 + 0.6048)
    # decode of 40 running: 8 ms per step; TPOT 60 ms x 0.8 safety -> 83% may be prefill
    assert MODEL.max_work_rate(40, 0.06, 0.8) == pytest.approx(1 - 0.008 / 0.048)
    assert MODEL.max_work_rate(40, None) == 1.0
    assert MODEL.max_work_rate(10_000, 0.06) == 0.05  # never zero


def test_bucket_refills_and_lets_a_large_item_in_when_full() -> None:
    bucket = WorkBucket(capacity_s=1.0, now=0.0)
    bucket.set_rate(0.5, 0.0)
    assert bucket.fits(0.6, 0.0)
    bucket.take(0.6, 0.0)
    assert not bucket.fits(0.6, 0.0)
    assert bucket.wait_s(0.6, 0.0) == pytest.approx(0.4)  # (0.6 - 0.4) / 0.5
    assert bucket.fits(0.6, 0.4)
    bucket.take(3.0, 0.4)  # bigger than the bucket: allowed from full, borrows
    assert bucket.level(0.4) < 0
    assert bucket.fits(5.0, 100.0)  # a full bucket admits anything (capped at capacity)


def test_calibration_moves_toward_the_observed_ratio() -> None:
    cal = TtftCalibration(smoothing=0.5)
    cal.observe(1.0, 2.0)
    assert cal.ratio == pytest.approx(2.0)  # the first sample sets it
    cal.observe(1.0, 0.5)
    assert cal.ratio == pytest.approx(1.0)  # geometric mean of 2 and 0.5
    cal.observe(1.0, 1000.0)
    assert cal.ratio <= 8.0 ** 0.5 + 1e-9  # one outlier is bounded
    assert predicted_ttft_s(waited_s=0.5, queued_ahead_work_s=1.0, rate=0.5,
                            admitted_work_s=0.2, own_work_s=0.1, calibration=2.0) == (
        pytest.approx(0.5 + 2.0 + 0.6))
    assert math.isinf(predicted_ttft_s(waited_s=0, queued_ahead_work_s=1, rate=0,
                                       admitted_work_s=0, own_work_s=0, calibration=1))


async def test_requests_predicted_to_miss_are_refused_at_arrival() -> None:
    clock = FakeClock()
    ctl = slo_controller(clock)
    eng = FakeEngine(ctl)
    # five large images: 3.7 s of encoder work already admitted ahead of standard
    for i in range(5):
        submit(ctl, eng, f"big{i}", "standard", vision=1344)
        await settle()
    assert len(eng.granted) >= 1
    with pytest.raises(RequestRejectedError, match="predicted time to first token") as info:
        await ctl.admit(ctl.ticket("late", 1, "standard", None, prompt_tokens=1364,
                                   vision_tokens=1344))
    assert info.value.reason == "slo_infeasible" and info.value.retry_after_s > 0
    # an interactive request does not wait behind standard work: it is admitted
    submit(ctl, eng, "urgent", "interactive", vision=49)
    await settle()
    assert "urgent" in eng.granted
    # a class without an SLO is never refused for it
    submit(ctl, eng, "b", "batch", vision=1344)
    await settle()
    assert "b" not in eng.shed


async def test_work_enters_at_the_tpot_rate_and_queued_requests_that_can_no_longer_make_it_are_shed(
) -> None:
    clock = FakeClock()
    ctl = slo_controller(clock, work_burst_s=1.0)
    ctl.update_engine(0.1, 40)  # 40 running: rate 0.83 engine-s per s
    eng = FakeEngine(ctl)
    tickets = [submit(ctl, eng, f"img{i}", "standard", vision=1344) for i in range(4)]
    await settle()
    granted_now = list(eng.granted)
    assert granted_now == ["img0"]  # the 1 s bucket lets one 0.75 s image in, the rest waits
    for t in tickets:
        if t.request_id in granted_now:  # type: ignore[attr-defined]
            eng.start(t)  # type: ignore[arg-type]
            ctl.observe_ttft(t, 0.7)  # type: ignore[arg-type]
            eng.finish(t)  # type: ignore[arg-type]
    clock.now += 1.0
    ctl.poke()
    await settle()
    assert eng.granted == ["img0", "img1"]  # refilled: one more image's work went in
    clock.now += 10.0  # the rest waited far past its 3 s target
    ctl.poke()
    await settle()
    assert sorted(eng.shed) == ["img2", "img3"] and ctl.stats().queued == 0
    assert ctl.stats().classes["standard"].shed == 2


async def test_work_that_never_reaches_the_engine_is_given_back() -> None:
    """A granted request that fails in intake (a bad image) spent no engine time: its work
    returns to the bucket, so a flood of bad requests cannot hold good ones back; a
    request priced from an estimate is settled at its rendered size."""
    clock = FakeClock()
    ctl = slo_controller(clock, work_burst_s=1.0)
    ctl.update_engine(0.1, 40)
    eng = FakeEngine(ctl)
    bad = submit(ctl, eng, "bad", "standard", vision=1344)
    await settle()
    assert eng.granted == ["bad"]
    good = submit(ctl, eng, "good", "standard", vision=1344)
    await settle()
    assert "good" not in eng.granted  # the bad image's work was taken from the 1 s bucket
    eng.finish(bad, Release.FAILED)  # type: ignore[arg-type]  # failed before vLLM
    await settle()
    assert "good" in eng.granted  # without waiting for the bucket to refill
    eng.start(good)  # type: ignore[arg-type]
    eng.finish(good)  # type: ignore[arg-type]
    clock.now += 10.0
    # priced at arrival as a large image, rendered as a small one: the rest is given back
    est = submit(ctl, eng, "est", "standard", vision=1344)
    await settle()
    assert "est" in eng.granted
    before = ctl._bucket.level(clock.now)
    ctl.reprice(est, prompt_tokens=69, vision_tokens=49)  # type: ignore[arg-type]
    assert ctl._bucket.level(clock.now) - before == pytest.approx(
        MODEL.work_s(1364, 1344) - MODEL.work_s(69, 49))


async def test_cheap_requests_go_first_within_a_class() -> None:
    clock = FakeClock()
    ctl = slo_controller(clock, capacity=1)
    eng = FakeEngine(ctl)
    running = submit(ctl, eng, "running", "standard")
    await settle()
    submit(ctl, eng, "large", "standard", vision=1344)  # arrives first, 0.6 s of work
    clock.now += 0.1
    submit(ctl, eng, "text", "standard")  # arrives 0.1 s later, ~5 ms of work
    await settle()
    ctl.observe_ttft(running, 0.05)  # type: ignore[arg-type]
    eng.finish(running)  # type: ignore[arg-type]
    await settle()
    assert eng.granted[1] == "text"


async def test_slo_outcomes_and_prediction_error_are_counted() -> None:
    clock = FakeClock()
    ctl = slo_controller(clock)
    eng = FakeEngine(ctl)
    a = submit(ctl, eng, "a", "standard", vision=300)
    await settle()
    assert a.predicted_ttft_s is not None  # type: ignore[attr-defined]
    clock.now += 0.2
    ctl.observe_ttft(a, 0.2)  # type: ignore[arg-type]
    ctl.observe_finish(a, 0.2, 0.03)  # type: ignore[arg-type]
    ctl.release(a, Release.COMPLETED)  # type: ignore[arg-type]
    b = submit(ctl, eng, "b", "standard")
    await settle()
    ctl.observe_finish(b, 4.0, 0.03)  # type: ignore[arg-type]
    stats = ctl.stats().classes["standard"]
    assert (stats.slo_met, stats.slo_missed) == (1, 1)
    assert stats.ttft_prediction_error_p50 is not None
    assert ctl.stats().slo.active and ctl.stats().slo.calibration > 0


async def test_without_a_fitted_model_slo_admission_stays_out_of_the_way() -> None:
    clock = FakeClock()
    settings = AdmissionSettings(max_preparing=64)
    ctl = AdmissionController(settings, SLO, "standard", 64, clock=clock)
    eng = FakeEngine(ctl)
    for i in range(20):
        submit(ctl, eng, f"big{i}", "standard", vision=1344)
    await settle()
    assert len(eng.granted) == 20 and not eng.shed
    assert not ctl.stats().slo.active
