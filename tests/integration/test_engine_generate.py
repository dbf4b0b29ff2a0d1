"""PioEngine on real vLLM (CPU build) with the tiny Qwen3-VL, one engine for the session."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import (
    DeadlineExceededError,
    EmptyPromptError,
    ImageDecodeError,
    ImageFetchError,
    ImageNotFoundError,
    ImageSourceError,
    ImageTooLargeError,
    InvalidSamplingError,
    PioError,
    PromptTooLongError,
    TooManyImagesError,
    UnknownPriorityError,
)
from pio_vllm.request import PioRequest, RequestOutcome, RequestResult
from tests.helpers import (
    FILL_TOKENS,
    TEST_MAX_MODEL_LEN,
    assert_vllm_idle,
    encode,
    http_server,
    noise_image,
    png_with_header_size,
    serve_bytes,
    serve_slow,
)

pytestmark = [pytest.mark.engine]

GREEDY_16 = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}


def _hf_greedy(model_dir: Path, text: str, images: list, n: int) -> list[int]:  # type: ignore[type-arg]
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _chat(tokenizer, text: str, n_images: int) -> str:  # type: ignore[no-untyped-def]
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image+text"])
async def test_greedy_tokens_equal_transformers(
    engine: PioEngine, tiny_model_dir: Path, with_image: bool
) -> None:
    images = [noise_image(320, 240, seed=11)] if with_image else []
    result = await engine.complete(
        PioRequest(prompt="describe the picture", images=images, sampling=GREEDY_16))
    text = _chat(engine.backend.tokenizer, "describe the picture", len(images))
    expected = await asyncio.to_thread(_hf_greedy, tiny_model_dir, text, images, 16)
    assert list(result.token_ids) == expected
    assert len(set(result.token_ids)) > 1, "greedy output collapsed to one repeated token"
    if with_image:
        assert result.vision_tokens == 80 and result.prompt_tokens > 80


async def test_output_depends_on_image_and_prompt(engine: PioEngine) -> None:
    a, b = noise_image(320, 240, seed=1), noise_image(320, 240, seed=2)
    results = await engine.generate_batch([
        PioRequest(prompt="describe", images=[a], sampling=GREEDY_16),
        PioRequest(prompt="describe", images=[b], sampling=GREEDY_16),
        PioRequest(prompt="describe the cat", sampling=GREEDY_16),
        PioRequest(prompt="what colour is the sky", sampling=GREEDY_16),
    ])
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].token_ids != results[1].token_ids
    assert results[2].token_ids != results[3].token_ids


async def test_stream_deltas_add_up_to_the_result(engine: PioEngine) -> None:
    deltas, ids, final = [], [], None
    async for out in engine.generate(PioRequest(
            prompt="hello", images=[noise_image(64, 64, 3)], sampling=GREEDY_16,
            priority="interactive", metadata={"user": "u1"})):
        deltas.append(out.text_delta)
        ids.extend(out.token_ids)
        if out.finished:
            final = out.result
    assert final is not None and final.outcome is RequestOutcome.FINISHED
    assert "".join(deltas) == final.text and tuple(ids) == final.token_ids
    assert final.output_tokens == 16 and final.finish_reason == "length"
    assert final.priority == 0 and final.priority_class == "interactive"
    assert final.metadata == {"user": "u1"}
    t = final.timings
    assert t.arrival_at <= t.submitted_at <= t.first_token_at <= t.finished_at  # type: ignore[operator]
    await assert_vllm_idle(engine)


async def test_breaking_out_of_the_stream_aborts_in_vllm(engine: PioEngine) -> None:
    seen: list[RequestResult] = []
    stream = engine.generate(PioRequest(
        prompt="long story", sampling={"max_tokens": FILL_TOKENS, "ignore_eos": True},
        on_complete=seen.append))
    async for _ in stream:
        break
    await stream.aclose()
    await assert_vllm_idle(engine)
    await _wait_for(lambda: bool(seen))
    assert seen[0].outcome is RequestOutcome.CANCELLED


async def test_cancelling_the_task_aborts_in_vllm(engine: PioEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(PioRequest(
                prompt="long story", sampling={"max_tokens": FILL_TOKENS, "ignore_eos": True})):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_vllm_idle(engine)


async def test_deadline_ends_a_running_request(engine: PioEngine) -> None:
    with pytest.raises(DeadlineExceededError, match="deadline passed"):
        await engine.complete(PioRequest(
            prompt="long story", sampling={"max_tokens": FILL_TOKENS, "ignore_eos": True},
            timeout_s=0.5))
    await assert_vllm_idle(engine)


def _bad_requests(base_url: str, tmp_path: Path) -> list[tuple[PioRequest, type[PioError], str]]:
    return [
        (PioRequest(prompt="x", images=[b"\x89PNG garbage"]), ImageDecodeError, "cannot identify"),
        (PioRequest(prompt="x", images=[tmp_path / "missing.png"]), ImageNotFoundError,
         "does not exist"),
        (PioRequest(prompt="x", images=["gopher://h/x.png"]), ImageSourceError, "'gopher'"),
        (PioRequest(prompt="x", images=[f"{base_url}/slow.png"]), ImageFetchError,
         "fetch_timeout_s"),
        (PioRequest(prompt="x", images=[f"{base_url}/huge.png"]), ImageTooLargeError,
         "max_image_bytes"),
        (PioRequest(prompt="x", images=[png_with_header_size(7000, 7000)]), ImageTooLargeError,
         "max_image_pixels"),
        (PioRequest(prompt="x", images=[png_with_header_size(60000, 60000)]),
         ImageTooLargeError, "decompression bomb"),
        (PioRequest(prompt="x", images=[noise_image(8, 8, 0)] * 5), TooManyImagesError,
         "at most 4"),
        (PioRequest(prompt=""), EmptyPromptError, "prompt is empty"),
        (PioRequest(prompt="the " * (TEST_MAX_MODEL_LEN + 10)), PromptTooLongError,
         f"max_model_len is {TEST_MAX_MODEL_LEN}"),
        # 'the ' is one token of the tiny tokenizer: the text alone fits, its images do not
        (PioRequest(prompt="the " * (TEST_MAX_MODEL_LEN - 2000),
                    images=[noise_image(2000, 2000, 0)] * 3), PromptTooLongError,
         "text plus vision tokens"),
        (PioRequest(prompt="x", sampling={"max_tokens": 0}), InvalidSamplingError,
         "max_tokens=0"),
        (PioRequest(prompt="x", sampling={"max_tokens": -5}), InvalidSamplingError,
         "max_tokens=-5"),
        (PioRequest(prompt="x", sampling={"temperature": -1.0}), InvalidSamplingError,
         "temperature"),
        (PioRequest(prompt="x", sampling={"max_tokenz": 3}), InvalidSamplingError, "max_tokenz"),
        (PioRequest(prompt="x", priority="vip"), UnknownPriorityError, "'vip'"),
        (PioRequest(prompt="x", priority=1.5), UnknownPriorityError, "1.5"),  # type: ignore[arg-type]
    ]


async def test_bad_inputs_get_typed_errors_and_the_engine_keeps_serving(
    engine: PioEngine, tmp_path: Path
) -> None:
    routes = {"/slow.png": serve_slow(4.0),
              "/huge.png": serve_bytes(b"x" * (engine.settings.images.max_image_bytes + 1))}
    good = PioRequest(prompt="describe", images=[noise_image(96, 96, 9)], sampling=GREEDY_16)
    with http_server(routes) as base:
        cases = _bad_requests(base, tmp_path)
        # The batch class has no SLO: seventeen requests at once, most with an image of unknown
        # size, would otherwise be refused by SLO admission before intake saw them.
        batch = [replace(req, priority="batch") if req.priority is None else req
                 for req, _, _ in cases]
        results = await engine.generate_batch([good] + batch + [good])
    assert results[0].ok and results[-1].ok
    assert results[0].token_ids == results[-1].token_ids
    for (req, error_type, match), res in zip(cases, results[1:-1], strict=True):
        assert res.outcome is RequestOutcome.FAILED
        assert isinstance(res.error, error_type), (req, res.error)
        assert __import__("re").search(match, str(res.error)), (match, str(res.error))
    await assert_vllm_idle(engine)


async def test_callbacks_sync_async_and_raising(
    engine: PioEngine, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[RequestResult] = []
    done = asyncio.Event()

    async def async_cb(result: RequestResult) -> None:
        got.append(result)
        done.set()

    def raising_cb(result: RequestResult) -> None:
        raise RuntimeError("callback bug")

    caplog.set_level(logging.ERROR, logger="pio_vllm")
    r1 = await engine.complete(PioRequest(prompt="hi", sampling=GREEDY_16, on_complete=async_cb,
                                          metadata={"k": 1}))
    r2 = await engine.complete(PioRequest(prompt="hi", sampling=GREEDY_16,
                                          on_complete=raising_cb))
    await asyncio.wait_for(done.wait(), 10)
    assert got[0].text == r1.text and got[0].metadata == {"k": 1}
    assert r2.ok and r2.token_ids == r1.token_ids  # the raising callback changed nothing
    await _wait_for(lambda: "callback bug" in caplog.text or "raised" in caplog.text)
    assert "on_complete callback" in caplog.text


async def test_batch_keeps_input_order_and_chat_messages(engine: PioEngine) -> None:
    img = noise_image(128, 96, 5)
    data_url = "data:image/png;base64," + __import__("base64").b64encode(encode(img)).decode()
    requests = [
        PioRequest(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "describe"}]}], sampling=GREEDY_16, request_id="chat"),
        PioRequest(prompt="describe", images=[img], sampling=GREEDY_16, request_id="plain"),
        PioRequest(prompt="", request_id="bad"),
    ]
    results = await engine.generate_batch(requests)
    assert [r.request_id for r in results] == ["chat", "plain", "bad"]
    assert results[0].token_ids == results[1].token_ids  # same prompt and pixels either way
    assert results[2].outcome is RequestOutcome.FAILED
    await assert_vllm_idle(engine)


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_prompts_reach_vllm_rendered_not_raw(engine: PioEngine) -> None:
    """vLLM 0.32 deprecates raw prompts in its InputProcessor ("Passing raw prompts to
    InputProcessor is deprecated"): pio renders with vLLM's Renderer first, so every
    in-process request reaches the InputProcessor as an engine input (a dict with 'type').
    vLLM 0.23 has no Renderer and takes the raw prompt."""
    from pio_vllm.engine.vllm_backend import vllm_version

    if vllm_version() < (0, 32):
        pytest.skip("vLLM 0.23 has no Renderer: raw prompts are its API")
    processor = engine.backend.llm.input_processor
    seen: list[bool] = []
    original = processor.process_inputs

    def spy(request_id: str, prompt: object, *args: object, **kwargs: object) -> object:
        seen.append(isinstance(prompt, dict) and "type" in prompt)
        return original(request_id, prompt, *args, **kwargs)

    processor.process_inputs = spy
    try:
        result = await engine.complete(PioRequest(
            prompt="what is this", images=[noise_image(96, 64, 1)], sampling=GREEDY_16))
    finally:
        del processor.process_inputs  # the instance attribute; the class method is back
    assert result.ok and result.vision_tokens > 0
    assert seen == [True]
