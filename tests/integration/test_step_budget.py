"""The step budget on real vLLM (CPU, tiny model, the session engine): with steps priced
high (an artificially low budget), batch images are encoded one per step, and an urgent
request's prefill goes before a running batch request's remaining prefill chunks.

The tiny model's real steps take milliseconds, far inside the 0.25 s budget its config
derives (a quarter of the interactive class's 1 s TTFT target); these tests send the
scheduler inflated step prices through the same utility call the frontend's fit uses, and
restore the default profile afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pio_vllm.cost.step_budget import PROFILES
from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.request import PioRequest
from pio_vllm.tuning.batch_tuner import StepSample
from tests.helpers import TEST_MAX_MODEL_LEN, assert_vllm_idle, noise_image

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# 1 ms a token, 10 ms a vision token: against the 0.25 s budget, a step takes 256 prefill
# tokens (tuning.min_step_tokens) and at most 22 vision tokens, i.e. one image, alone.
EXPENSIVE = (0.0, 0.001, 0.01)


@pytest_asyncio.fixture
async def priced_high(engine: PioEngine) -> AsyncIterator[PioEngine]:
    loop, admission = engine.tuning, engine.admission
    assert loop is not None and admission is not None
    assert engine.settings.step_budget_s() == pytest.approx(0.25)
    await loop.pause()  # its next round would send the real fit
    admission.set_work_model(None)  # SLO admission stands aside: these tests are the engine's
    backend = engine.backend
    await backend.batch_limits(None, None, None, None, EXPENSIVE)
    try:
        yield engine
    finally:
        tiny = PROFILES["tiny-cpu"]
        await backend.batch_limits(None, None, None, None,
                                   (tiny.base_s, tiny.per_token_s, tiny.per_vision_token_s))
        loop.resume()


async def test_batch_images_are_encoded_one_per_step(priced_high: PioEngine) -> None:
    engine = priced_high
    backend = engine.backend
    before = (await backend.batch_limits(None, None, None))["step_budget"]
    reqs = [PioRequest(prompt=f"image {i}", images=[noise_image(320 + 32 * i, 240, 200 + i)],
                       priority="batch", sampling={"max_tokens": 8, "ignore_eos": True})
            for i in range(5)]
    results = await engine.generate_batch(reqs)
    assert all(r.ok for r in results), [r.error for r in results]
    limits = await backend.batch_limits(None, None, None)
    steps = [StepSample(*s) for s in limits["samples"]]
    encoded = [s.vision_tokens for s in steps if s.vision_tokens]
    assert sorted(encoded) == sorted(r.vision_tokens for r in results)  # one per step
    after = limits["step_budget"]
    assert after["alone_steps"] - before["alone_steps"] >= len(reqs)
    assert after["profile"][:3] == list(EXPENSIVE)
    await assert_vllm_idle(engine)


async def test_an_urgent_prefill_goes_before_a_running_batch_prefill(
        priced_high: PioEngine) -> None:
    """A batch request with a prompt of most of the context prefills 256 tokens a step
    (~120 steps); an interactive request sent once it runs gets its first token first."""
    engine = priced_high
    probe = engine.backend.probe
    long_prompt = "the " * (TEST_MAX_MODEL_LEN - 1000)
    firsts: dict[str, float] = {}

    async def first_token(name: str, request: PioRequest) -> None:
        async for out in engine.generate(request):
            if out.token_ids and name not in firsts:
                firsts[name] = time.perf_counter()

    batch = asyncio.create_task(first_token("batch", PioRequest(
        prompt=long_prompt, priority="batch", sampling={"max_tokens": 2, "ignore_eos": True})))
    deadline = time.monotonic() + 120
    while probe.snapshot().num_running < 1:  # the batch request is in vLLM, prefilling
        assert time.monotonic() < deadline and not batch.done(), "the batch request never ran"
        await asyncio.sleep(0.005)
    assert "batch" not in firsts  # its prefill is far from done: the race is by construction
    await first_token("urgent", PioRequest(prompt="now", priority="interactive",
                                           sampling={"max_tokens": 2, "ignore_eos": True}))
    await batch
    assert firsts["urgent"] < firsts["batch"]
    stats = (await engine.backend.batch_limits(None, None, None))["step_budget"]
    assert stats["deferred"] > 0
    await assert_vllm_idle(engine)
