"""BatchTuner and CostModel on synthetic step-time models (pure code, no vLLM)."""

from __future__ import annotations

import random

import pytest

from pio_vllm.cost.request_cost import MIN_HISTORY, CostModel
from pio_vllm.cost.vision_tokens import VisionGeometry, vision_tokens
from pio_vllm.settings import TuningSettings
from pio_vllm.tuning.batch_tuner import (
    BatchLimits,
    BatchTuner,
    LimitSource,
    RequestMix,
    StepSample,
)

STATIC = BatchLimits(max_active=64, max_tokens=8192)
MIX = RequestMix(requests=10, mean_kv_blocks=4.0, mean_image_vision_tokens=0.0)


def steps(n: int, base: float, per_token: float, per_vision: float, noise: float = 0.0,
          seed: int = 0) -> list[StepSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = rng.randint(1, 4096)
        vision = rng.choice([0, 0, 0, 256, 1024])
        t = base + per_token * tokens + per_vision * vision
        out.append(StepSample(tokens, vision, rng.randint(1, 32), t * (1 + rng.gauss(0, noise))))
    return out


def tuner(**kw: object) -> BatchTuner:
    settings = TuningSettings(**{"tpot_target_s": 0.05, "min_samples": 16, **kw})  # type: ignore[arg-type]
    return BatchTuner(settings, STATIC, kv_blocks_total=None, token_floor=512)


def test_fit_recovers_the_step_model_and_limits_converge() -> None:
    t = tuner(cap_encoder=True)
    t.observe(steps(200, base=0.004, per_token=2e-5, per_vision=1e-5))
    mix = RequestMix(10, 4.0, mean_image_vision_tokens=1000.0)
    for _ in range(40):
        limits = t.decide(mix)
    model = t.stats().model
    assert model is not None and model.r2 > 0.999
    assert model.base_s == pytest.approx(0.004, rel=1e-3)
    assert model.per_token_s == pytest.approx(2e-5, rel=1e-3)
    assert model.per_vision_token_s == pytest.approx(1e-5, rel=1e-3)
    # 0.004 + 2e-5*T + 1e-5*1000 <= 0.05  ->  T = 1800; decode: (0.05-0.004)/2e-5 = 2300
    # encoder: 0.004 + 2e-5*64 + 1e-5*E <= 0.05  ->  E = 4472 vision tokens per step
    assert limits == BatchLimits(max_active=64, max_tokens=1800, source=LimitSource.TUNED,
                                 max_encoder_tokens=4472)
    # larger images in the mix -> a smaller step budget
    for _ in range(40):
        bigger = t.decide(RequestMix(10, 4.0, mean_image_vision_tokens=3000.0))
    assert bigger.max_tokens == 800  # (0.05 - 0.004 - 1e-5*3000) / 2e-5
    for _ in range(40):
        huge = t.decide(RequestMix(10, 4.0, mean_image_vision_tokens=5000.0))
    assert huge.max_tokens == 512  # no room left: the floor


def test_limits_respect_static_bounds_and_floors() -> None:
    fast = tuner()
    fast.observe(steps(100, base=0.0001, per_token=1e-9, per_vision=0.0))
    for _ in range(30):
        limits = fast.decide(MIX)
    assert (limits.max_active, limits.max_tokens) == (STATIC.max_active, STATIC.max_tokens)
    slow = tuner(min_active=2)
    slow.observe(steps(100, base=0.04, per_token=1e-3, per_vision=0.0))
    for _ in range(30):
        limits = slow.decide(MIX)
    assert (limits.max_active, limits.max_tokens) == (10, 512)  # (0.05-0.04)/1e-3; floor
    slower = tuner(min_active=2)
    slower.observe(steps(100, base=0.06, per_token=1e-3, per_vision=0.0))  # never meets it
    for _ in range(30):
        limits = slower.decide(MIX)
    assert (limits.max_active, limits.max_tokens) == (2, 512)


def test_kv_capacity_bounds_running_requests() -> None:
    settings = TuningSettings(tpot_target_s=0.05, min_samples=16)
    t = BatchTuner(settings, STATIC, kv_blocks_total=1000, kv_high_watermark=0.9,
                   token_floor=512)
    t.observe(steps(100, base=0.004, per_token=1e-6, per_vision=0.0))
    for _ in range(40):
        limits = t.decide(RequestMix(100, mean_kv_blocks=30.0, mean_image_vision_tokens=0))
    assert limits.max_active == 30  # 1000 * 0.9 / 30


def test_stable_under_noise() -> None:
    t = tuner()
    t.observe(steps(256, base=0.004, per_token=2e-5, per_vision=1e-5, noise=0.1))
    decisions = [t.decide(MIX) for _ in range(30)]
    for i in range(5):  # keep refitting on fresh noisy windows
        t.observe(steps(64, base=0.004, per_token=2e-5, per_vision=1e-5, noise=0.1, seed=i + 1))
        decisions += [t.decide(MIX) for _ in range(5)]
    tail = [d.max_tokens for d in decisions[30:]]
    assert max(tail) - min(tail) <= 0.1 * 2300, tail  # within 10% of the ~2300 target
    assert all(d.source is LimitSource.TUNED for d in decisions)


def test_falls_back_to_static_limits() -> None:
    t = tuner()
    assert t.decide(MIX).source is LimitSource.STATIC_NO_DATA
    assert t.limits.max_active == STATIC.max_active
    rng = random.Random(0)
    t.observe(StepSample(rng.randint(1, 4096), 0, 1, rng.uniform(0.001, 0.1))
              for _ in range(200))  # step time unrelated to the work
    limits = t.decide(MIX)
    assert limits.source is LimitSource.STATIC_POOR_FIT
    assert (limits.max_active, limits.max_tokens) == (STATIC.max_active, STATIC.max_tokens)


def test_smoothing_moves_part_of_the_way() -> None:
    t = tuner(smoothing=0.5)
    t.observe(steps(100, base=0.04, per_token=1e-3, per_vision=0.0))
    first = t.decide(MIX)
    assert 10 < first.max_active < STATIC.max_active  # half way from 64 towards 10
    assert first.max_active == 37


def test_cost_model_prices_images_and_learns_output_lengths() -> None:
    geometry = VisionGeometry()
    model = CostModel(geometry, block_size=32)
    cost = model.cost(text_tokens=20, image_sizes=[(1344, 1008), (320, 240)], max_tokens=256,
                      class_name="batch")
    n_vision = vision_tokens(1344, 1008, geometry) + vision_tokens(320, 240, geometry)
    assert cost.vision_tokens == n_vision and cost.prompt_tokens == 20 + n_vision
    assert cost.expected_output_tokens == 256  # no history yet
    assert cost.kv_blocks == -(-(20 + n_vision + 256) // 32)
    for n in range(MIN_HISTORY):
        model.observe_output("batch", 40 + n)
    # p90 of 40..47 by linear interpolation is 46.3, rounded up to whole tokens
    assert model.expected_output_tokens("batch", 256) == 47
    assert model.expected_output_tokens("batch", 10) == 10  # never above max_tokens
    assert model.expected_output_tokens("interactive", 256) == 256  # per class


def test_correlated_terms_are_dropped_not_clipped() -> None:
    """Image placeholders are part of a step's tokens: when vision tokens carry no extra
    cost the free fit may give them a negative slope; the term is dropped and refitted."""
    rng = random.Random(3)
    samples = []
    for _ in range(200):
        vision = rng.choice([0, 300, 1200])
        tokens = vision + rng.randint(1, 600)
        samples.append(StepSample(tokens, vision, 4,
                                  (0.004 + 3e-5 * tokens) * (1 + rng.gauss(0, 0.02))))
    t = tuner()
    t.observe(samples)
    model = t.fit()
    assert model is not None and model.r2 > 0.9
    assert model.per_token_s == pytest.approx(3e-5, rel=0.1)
    assert model.per_vision_token_s >= 0


def test_encoder_cap_is_opt_in() -> None:
    t = tuner()
    t.observe(steps(200, base=0.004, per_token=2e-5, per_vision=1e-5))
    assert t.decide(MIX).max_encoder_tokens is None


class _StepsBackend:
    """What TuningLoop reads of VllmBackend: static limits and the engine's step samples."""

    max_num_seqs, max_num_batched_tokens, kv_blocks_total = 64, 8192, None

    def __init__(self) -> None:
        self.pending: list[StepSample] = []
        self.errored = False
        self.calls = 0

    async def batch_limits(self, *_: object) -> dict[str, object]:
        self.calls += 1
        samples, self.pending = self.pending, []
        return {"samples": [(s.tokens, s.vision_tokens, s.requests, s.step_s) for s in samples]}


async def test_the_loop_sends_nothing_to_a_dead_engine() -> None:
    """A utility call to a dead engine is never answered; a keep-alive server with one
    outstanding did not stop on SIGTERM. The loop stops calling once the engine is dead."""
    import asyncio

    from pio_vllm.engine.batch_tuning import TuningLoop

    backend = _StepsBackend()
    loop = TuningLoop(TuningSettings(interval_s=0.01), backend, None, lambda: MIX,  # type: ignore[arg-type]
                      0.9, 2, None, apply_limits=False)
    loop.ensure_started()
    while backend.calls < 2:
        await asyncio.sleep(0.01)
    backend.errored = True
    seen = backend.calls
    while loop._task is not None and not loop._task.done():  # it ends by itself
        await asyncio.sleep(0.01)
    assert backend.calls <= seen + 1  # at most the call already under way
    await loop.aclose()


async def test_a_poor_refit_keeps_the_last_good_work_model() -> None:
    """SLO admission prices with the last fit whose R^2 passed tuning.min_r2: a window of
    near-identical decode steps (R^2 near 0) must not turn it off."""
    from pio_vllm.admission.controller import AdmissionController
    from pio_vllm.engine.batch_tuning import TuningLoop
    from pio_vllm.settings import AdmissionSettings, PriorityClass

    classes = {"standard": PriorityClass(level=0, max_queue_len=8, weight=1.0,
                                         ttft_target_s=3.0, tpot_target_s=0.06)}
    admission = AdmissionController(AdmissionSettings(), classes, "standard", 8)
    backend = _StepsBackend()
    settings = TuningSettings(min_samples=16, window=64)
    loop = TuningLoop(settings, backend, admission, lambda: MIX, 0.9, 2,  # type: ignore[arg-type]
                      None, apply_limits=False)

    await loop.step()
    assert admission.stats().slo.model is None  # nothing fitted yet: capacity only

    backend.pending = steps(64, base=0.004, per_token=2e-5, per_vision=4e-4, noise=0.01)
    await loop.step()
    good = admission.stats().slo.model
    assert good is not None and good.per_vision_token_s == pytest.approx(4e-4, rel=0.05)

    rng = random.Random(1)  # decode only: one token per request, noise around 20 ms
    backend.pending = [StepSample(8, 0, 8, 0.02 + rng.gauss(0, 0.002)) for _ in range(64)]
    await loop.step()
    refit = loop.stats().model
    assert refit is not None and refit.r2 < settings.min_r2, refit
    assert admission.stats().slo.model == good
