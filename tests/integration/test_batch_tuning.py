"""Batch tuning on real vLLM (CPU): BatchLimitScheduler's limits change at runtime through
the engine-core utility call, and the tuning loop fits the engine's step time.

The session engine runs BatchLimitScheduler already (its config's SLO targets turn on SLO
admission, which fits the same step model); these tests pause its observe-only loop, run a
limit-applying one, and restore the engine's limits afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from pio_vllm.engine.batch_tuning import TuningLoop
from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.request import PioRequest
from pio_vllm.tuning.batch_tuner import StepSample
from tests.helpers import noise_image

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@dataclass
class Tuned:
    engine: PioEngine
    loop: TuningLoop


@pytest_asyncio.fixture
async def tuned(engine: PioEngine) -> AsyncIterator[Tuned]:
    """The session engine with a limit-applying tuning loop instead of its own."""
    own = engine.tuning
    assert own is not None and engine.admission is not None
    await own.pause()  # requests would restart a merely closed loop (generate starts it)
    settings = engine.settings.tuning.model_copy(update={
        "enabled": True, "interval_s": 0.1, "min_samples": 16, "tpot_target_s": 0.05})
    admission = engine.settings.admission
    loop = TuningLoop(settings, engine.backend, engine.admission, engine._request_mix,
                      admission.kv_high_watermark, admission.lookahead, None)
    loop.ensure_started()
    try:
        yield Tuned(engine, loop)
    finally:
        await loop.aclose()
        backend = engine.backend
        await backend.batch_limits(backend.max_num_seqs, backend.max_num_batched_tokens,
                                   backend.max_num_batched_tokens, 10**9)
        engine.admission.set_capacity(backend.max_num_seqs + admission.lookahead)
        own.resume()


def requests(n: int, tokens: int, images: bool = False) -> list[PioRequest]:
    return [PioRequest(prompt=f"count {i}", images=[noise_image(320 + 32 * i, 240, i)]
                       if images else [],
                       sampling={"max_tokens": tokens, "ignore_eos": True, "temperature": 0})
            for i in range(n)]


async def test_tuning_loop_fits_step_time_and_applies_limits(tuned: Tuned) -> None:
    tuned_engine, loop = tuned.engine, tuned.loop
    await tuned_engine.generate_batch(requests(8, 48, images=True) + requests(8, 48))
    await loop.step()  # one more round trip after the traffic
    stats = loop.stats()
    assert stats is not None and stats.decisions > 0
    assert stats.model is not None and stats.model.samples >= 16
    # which term carries the cost depends on the machine (on a loaded 2-core CPU the vision
    # encoder can explain all of it); the fit must explain the measured steps
    assert stats.model.per_token_s > 0 or stats.model.per_vision_token_s > 0
    assert stats.model.r2 >= tuned_engine.settings.tuning.min_r2
    # what the scheduler runs with is what the tuner chose (pushed on the next round)
    pushed = loop.tuner.limits
    await loop.step()
    assert (loop.engine_limits["max_active"], loop.engine_limits["max_tokens"]) == (
        pushed.max_active, pushed.max_tokens)
    print("fitted step model:", stats.model, "limits:", stats.limits)
    assert tuned_engine.admission is not None
    lookahead = tuned_engine.settings.admission.lookahead
    assert tuned_engine.admission.capacity == loop.tuner.limits.max_active + lookahead


async def test_runtime_cap_bounds_running_requests(tuned: Tuned) -> None:
    tuned_engine, loop = tuned.engine, tuned.loop
    assert tuned_engine.admission is not None
    await loop.aclose()  # hold the limits still: no tuner decisions during this test
    # and no SLO rationing: the running-set cap it derives from the step model would bound
    # what pio lets into vLLM below the 5 this test raises the scheduler's cap to
    tuned_engine.admission.set_work_model(None)
    backend = tuned_engine.backend
    tuned_engine.admission.set_capacity(10)  # pio lets all 8 into vLLM ...
    await backend.batch_limits(2, None, None)  # ... the scheduler runs at most 2
    await backend.batch_limits(None, None, None)  # drop samples from before the cap
    await tuned_engine.generate_batch(requests(8, 24))
    capped = [StepSample(*s) for s in (await backend.batch_limits(5, None, None))["samples"]]
    assert capped and max(s.requests for s in capped) == 2
    await tuned_engine.generate_batch(requests(8, 24))
    raised = [StepSample(*s) for s in (await backend.batch_limits(None, None, None))["samples"]]
    assert max(s.requests for s in raised) == 5
    limits = await backend.batch_limits(10_000, 10**9, None)  # never above start buffers
    assert (limits["max_active"], limits["max_tokens"]) == (
        backend.max_num_seqs, backend.max_num_batched_tokens)


async def test_encoder_budget_encodes_one_image_per_step(tuned: Tuned) -> None:
    """An encoder budget below one image still encodes the largest waiting image whole,
    one per step, instead of several images in one step."""
    from pio_vllm.cost.vision_tokens import vision_tokens

    tuned_engine = tuned.engine
    backend = tuned_engine.backend
    assert tuned_engine.admission is not None
    await tuned.loop.aclose()
    tuned_engine.admission.set_work_model(None)  # no SLO rationing (see above)
    tuned_engine.admission.set_capacity(10)
    sizes = [(320 + 32 * i, 240) for i in range(6)]
    largest = max(vision_tokens(w, h, backend.geometry) for w, h in sizes)
    limits = await backend.batch_limits(8, None, None, 1)
    assert limits["max_encoder_tokens"] == 1
    reqs = [PioRequest(prompt=f"image {i}", images=[noise_image(w, h, 100 + i)],
                       sampling={"max_tokens": 8, "ignore_eos": True})
            for i, (w, h) in enumerate(sizes)]
    results = await tuned_engine.generate_batch(reqs)
    assert all(r.error is None for r in results)
    steps = [StepSample(*s) for s in (await backend.batch_limits(
        None, None, None, 10**9))["samples"]]
    encoded = [s.vision_tokens for s in steps if s.vision_tokens]
    assert len(encoded) == len(sizes)  # one image per step ...
    assert max(encoded) <= largest  # ... never two at once
