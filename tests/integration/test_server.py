"""`pio-vllm serve` as a real process, driven with the official `openai` client and httpx.

The session's shared server (conftest `server`: tiny model, real vLLM CPU engine, API keys
on, see server_helpers.shared_server_config); test_server_abuse.py sends it hostile input,
test_server_shutdown.py drains it last.
"""

from __future__ import annotations

import asyncio
import base64
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import (
    FILL_TOKENS,
    HeldImage,
    encode,
    noise_image,
    png_with_header_size,
    serve_bytes,
)
from tests.server_helpers import MODEL, ImageHost, Server, metric

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(url: str, text: str = "Describe the image.") -> list[dict[str, object]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": text},
    ]}]


def client(server: Server, key: str = "key-plain", **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0,
                              **kw)  # type: ignore[arg-type]


def scrape(server: Server) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


async def wait_idle(server: Server, timeout_s: float = 10) -> str:
    """/metrics once vLLM runs nothing and pio holds nothing (the leak check)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = scrape(server)
        busy = sum(metric(text, name) for name in (
            "vllm:num_requests_running", "vllm:num_requests_waiting",
            "pio_running_requests", "pio_queued_requests"))
        if busy == 0:
            return text
        await asyncio.sleep(0.2)
    raise AssertionError(f"server not idle after {timeout_s}s")


async def test_models_health_and_metrics(server: Server) -> None:
    models = await client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.base_url + "/health").status_code == 200
    text = scrape(server)
    assert "vllm:num_requests_running" in text  # vLLM's metrics ...
    assert "pio_running_requests" in text  # ... and pio's, on one endpoint
    # the API key's tenant labels pio's request count (key-plain is tenant gamma)
    assert metric(text, "pio_requests_total", tenant="gamma", priority_class="standard",
                  status="200") >= 1


async def test_chat_with_data_url_image_streaming_and_not(server: Server) -> None:
    c = client(server)
    png = encode(noise_image(320, 240, seed=1))
    messages = image_message(data_url(png))
    full = await c.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    # 320x240 -> 10x8 merged patches = 80 vision tokens, plus the text.
    assert full.usage.prompt_tokens > 80
    stream = await c.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                             max_tokens=12, temperature=0, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == full.choices[0].message.content
    other = await c.chat.completions.create(
        model=MODEL, messages=image_message(data_url(encode(noise_image(320, 240, seed=2)))),  # type: ignore[arg-type]
        max_tokens=12, temperature=0)
    assert other.choices[0].message.content != text  # the pixels reached the model
    await wait_idle(server)


async def test_http_image_url_is_fetched_by_pio(server: Server,
                                               image_host: ImageHost) -> None:
    png = encode(noise_image(320, 240, seed=1))
    image_host.routes["/img.png"] = serve_bytes(png)
    c = client(server)
    by_url = await c.chat.completions.create(
        model=MODEL, messages=image_message(image_host.base + "/img.png"),  # type: ignore[arg-type]
        max_tokens=8, temperature=0)
    by_data = await c.chat.completions.create(
        model=MODEL, messages=image_message(data_url(png)),  # type: ignore[arg-type]
        max_tokens=8, temperature=0)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content


async def test_priority_from_body_header_and_key(server: Server) -> None:
    def done(text: str, cls: str) -> float:
        return metric(text, "pio_admission_events_total", priority_class=cls, event="completed")

    before = scrape(server)
    prompt = [{"role": "user", "content": "hello"}]
    await client(server, "key-plain").chat.completions.create(
        model=MODEL, messages=prompt, max_tokens=2, extra_body={"priority": "batch"})  # type: ignore[arg-type]
    await client(server, "key-interactive").chat.completions.create(
        model=MODEL, messages=prompt, max_tokens=2, extra_headers={"X-Priority": "0"})  # type: ignore[arg-type]
    await client(server, "key-batch").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    await client(server, "key-plain").chat.completions.create(
        model=MODEL, messages=prompt, max_tokens=2)  # type: ignore[arg-type]
    await client(server, "key-plain").chat.completions.create(  # vLLM's own header
        model=MODEL, messages=prompt, max_tokens=2, extra_headers={"X-Vllm-Priority": "2"})  # type: ignore[arg-type]
    after = scrape(server)
    assert done(after, "batch") - done(before, "batch") == 3  # body, key's class, vLLM header
    assert done(after, "interactive") - done(before, "interactive") == 1  # header level 0
    assert done(after, "standard") - done(before, "standard") == 1  # default class

    with pytest.raises(openai.BadRequestError, match="unknown priority class 'vip'"):
        await client(server).chat.completions.create(
            model=MODEL, messages=prompt, max_tokens=2, extra_headers={"X-Priority": "vip"})  # type: ignore[arg-type]
    with pytest.raises(openai.PermissionDeniedError, match="above this API key's class"):
        await client(server, "key-batch").chat.completions.create(
            model=MODEL, messages=prompt, max_tokens=2, extra_body={"priority": "interactive"})  # type: ignore[arg-type]
    # a key without a class: server.priority_ceiling (default: the default class) is the top
    with pytest.raises(openai.PermissionDeniedError, match="above server.priority_ceiling"):
        await client(server, "key-plain").chat.completions.create(
            model=MODEL, messages=prompt, max_tokens=2, extra_headers={"X-Priority": "0"})  # type: ignore[arg-type]


async def test_api_keys(server: Server) -> None:
    for key in ("wrong-key", ""):
        r = httpx.post(server.base_url + "/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"} if key else {},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == 401
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    # refused before any key matched: counted under tenant "-"
    assert metric(scrape(server), "pio_requests_total", tenant="-", status="401") >= 3
    for path in ("/health", "/version", "/metrics"):  # probes and scrapers need no key
        assert httpx.get(server.base_url + path).status_code == 200, path


async def test_shed_is_429_with_retry_after(server: Server) -> None:
    c = client(server, "key-batch")
    long_run = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}

    async def one() -> int:
        try:
            await c.completions.create(model=MODEL, prompt="count", **long_run)  # type: ignore[arg-type]
            return 200
        except openai.RateLimitError as e:
            assert e.response.headers["Retry-After"].isdigit()
            assert e.response.headers["x-llm-d-request-dropped-reason"] == "queue_full"
            assert "queue is full" in e.message
            return 429

    # 6 go to vLLM (max_num_seqs 4 + lookahead 2), 2 queue (batch max_queue_len), the
    # rest are shed at once.
    codes = await asyncio.gather(*(one() for _ in range(11)))
    assert codes.count(429) == 3, codes
    assert codes.count(200) == 8
    await wait_idle(server)


async def _fill_capacity(server: Server, key: str = "key-batch") -> list[object]:
    """Streams of long requests that take pio's whole capacity (max_num_seqs 4 running in
    vLLM + lookahead 2 waiting there); returns once each running one has streamed."""
    c = client(server, key)
    streams = [await c.completions.create(model=MODEL, prompt=f"fill {i}", max_tokens=FILL_TOKENS,
                                          stream=True, extra_body={"ignore_eos": True})
               for i in range(6)]
    for stream in streams[:4]:  # vLLM runs the first four: each streams a first chunk
        await stream.__anext__()
    return streams  # type: ignore[return-value]


async def test_queued_request_is_not_rendered_while_a_later_urgent_one_goes_first(
        server: Server, image_host: ImageHost) -> None:
    """With the capacity full of batch streams, a queued batch request's image URL is not
    fetched (so vLLM has not rendered it either) while an interactive request that arrived
    later is answered; closing the streams lets it through."""
    png = encode(noise_image(96, 64, seed=6))
    loop = asyncio.get_running_loop()
    fetched = asyncio.Event()

    def serve_png(h: BaseHTTPRequestHandler) -> None:
        loop.call_soon_threadsafe(fetched.set)
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(png)))
        h.end_headers()
        h.wfile.write(png)

    image_host.routes["/queued.png"] = serve_png
    streams = await _fill_capacity(server)
    queued = asyncio.create_task(client(server, "key-batch").chat.completions.create(
        model=MODEL, messages=image_message(image_host.base + "/queued.png"),  # type: ignore[arg-type]
        max_tokens=4))
    await _until(lambda: metric(scrape(server), "pio_queued_requests",
                                priority_class="batch") == 1)
    urgent = await client(server, "key-interactive").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "now"}], max_tokens=4)  # type: ignore[list-item]
    assert urgent.choices[0].finish_reason == "length"
    assert not fetched.is_set(), "the queued request's image was fetched"
    for stream in streams:
        await stream.close()  # type: ignore[attr-defined]
    answer = await asyncio.wait_for(queued, 60)
    assert fetched.is_set() and answer.usage is not None and answer.usage.prompt_tokens > 20
    await wait_idle(server)


async def test_client_leaving_while_queued_leaves_the_queue(server: Server) -> None:
    before = metric(scrape(server), "pio_admission_events_total", event="cancelled")
    streams = await _fill_capacity(server)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        request = http.build_request("POST", "/v1/completions", headers={
            "Authorization": "Bearer key-batch"}, json={"model": MODEL, "prompt": "q",
                                                        "max_tokens": 4, "stream": True})
        response = asyncio.create_task(http.send(request, stream=True))
        await _until(lambda: metric(scrape(server), "pio_queued_requests",
                                    priority_class="batch") == 1)
        response.cancel()  # the client goes away while its request waits in pio's queue
        await asyncio.gather(response, return_exceptions=True)
    await _until(lambda: metric(scrape(server), "pio_queued_requests") == 0)
    for stream in streams:
        await stream.close()  # type: ignore[attr-defined]
    text = await wait_idle(server)
    # the queued client and the six streams closed mid-way
    assert metric(text, "pio_admission_events_total", event="cancelled") == before + 7


async def _until(predicate: object, timeout_s: float = 30) -> None:
    """Wait until `predicate()` holds (a metric reached a value), polling /metrics."""
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_client_disconnect_aborts_in_vllm(server: Server) -> None:
    c = client(server)
    before = metric(scrape(server), "pio_admission_events_total", event="cancelled")
    stream = await c.completions.create(model=MODEL, prompt="go", max_tokens=FILL_TOKENS,
                                        stream=True,
                                        extra_body={"ignore_eos": True})
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.close()
    text = await wait_idle(server, timeout_s=10)  # long before FILL_TOKENS could finish
    assert metric(text, "pio_admission_events_total", event="cancelled") == before + 1


async def test_bad_inputs_get_4xx_and_server_keeps_serving(server: Server) -> None:
    c = client(server)
    url = server.base_url + "/v1/chat/completions"
    auth = {"Authorization": "Bearer key-plain"}
    r = httpx.post(url, content=b'{"model": "pio:tiny", "messages": [', headers={
        **auth, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text

    cases = {
        "invalid base64": image_message("data:image/png;base64,@@not-base64@@"),
        "unsupported scheme": image_message("ftp://127.0.0.1/x.png"),
        "local file": image_message("file:///etc/hostname"),
        "loopback address": image_message("http://127.0.0.1:1/x.png"),
        "oversized image": image_message(data_url(b"\x89PNG" + b"\0" * 2_100_000)),
        "decompression bomb": image_message(data_url(png_with_header_size(30000, 30000))),
        "too many images": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(encode(noise_image(64, 64, i)))}}
            for i in range(5)]}],
    }
    expect = {
        "invalid base64": "invalid base64", "unsupported scheme": "unsupported URL scheme",
        "local file": "local file", "loopback address": "a loopback address",
        "oversized image": "max_image_bytes", "decompression bomb": "max_image_pixels",
        "too many images": "at most 4",
    }
    for name, messages in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)  # type: ignore[arg-type]
        assert expect[name] in info.value.message, (name, info.value.message)
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="no-such-model", messages=[  # type: ignore[list-item]
            {"role": "user", "content": "x"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await c.chat.completions.create(model=MODEL, messages=[  # type: ignore[list-item]
            {"role": "user", "content": "x"}], max_tokens=-1)
    ok = await c.chat.completions.create(
        model=MODEL, messages=image_message(data_url(encode(noise_image(96, 64, 3)))),  # type: ignore[arg-type]
        max_tokens=4)
    assert ok.choices[0].finish_reason == "length"
    await wait_idle(server)


async def test_deadline_header_gives_504(server: Server) -> None:
    c = client(server)
    with pytest.raises(openai.APIStatusError) as info:
        await c.completions.create(model=MODEL, prompt="go", max_tokens=FILL_TOKENS,
                                   extra_body={"ignore_eos": True},
                                   extra_headers={"X-Request-Timeout-S": "0.5"})
    assert info.value.status_code == 504
    assert "deadline" in info.value.message
    await wait_idle(server)


async def test_preempted_requests_resume_with_identical_output(server: Server) -> None:
    """Interactive requests preempt running batch ones; the batch responses, streamed and
    not, equal an unpreempted run token for token (greedy)."""
    batch = client(server, "key-batch")
    args = {"model": MODEL, "prompt": "story", "max_tokens": 300, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    alone = await batch.completions.create(**args)  # type: ignore[call-overload]
    before = metric(scrape(server), "pio_admission_events_total", event="preempted")

    async def streamed() -> str:
        stream = await batch.completions.create(stream=True, **args)  # type: ignore[call-overload]
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def full() -> str:
        out = await batch.completions.create(**args)  # type: ignore[call-overload]
        assert out.usage.completion_tokens == 300 and out.usage.prompt_tokens == (
            alone.usage.prompt_tokens)
        return str(out.choices[0].text)

    runs = [asyncio.create_task(f()) for f in (streamed, full, streamed, full)]
    await _until(lambda: metric(scrape(server), "vllm:num_requests_running") == 4)
    urgent = client(server, "key-interactive")
    await asyncio.gather(*(urgent.completions.create(model=MODEL, prompt="now", max_tokens=4)
                           for _ in range(2)))
    texts = await asyncio.gather(*runs)
    assert metric(scrape(server), "pio_admission_events_total", event="preempted") >= before + 2
    assert all(t == alone.choices[0].text for t in texts)
    await wait_idle(server)


def test_vllm_bench_serve_client_works_against_pio(server: Server, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own benchmark client (vllm.benchmarks.serve) runs unchanged against pio."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv("OPENAI_API_KEY", "key-plain")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--base-url", server.base_url, "--model", MODEL, "--tokenizer", str(tiny_model_dir),
        "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16",
        "--num-prompts", "8", "--request-rate", "inf", "--ignore-eos", "--disable-tqdm",
    ])
    result = bench_serve(args)
    assert result["completed"] == 8, result
    assert result["total_output_tokens"] == 8 * 16


async def test_waiting_gauge_counts_what_pio_holds_and_objectives_name_classes(
        server: Server, image_host: ImageHost) -> None:
    """vllm:num_requests_waiting (what llm-d's endpoint picker reads) counts vLLM's waiting
    queue plus pio's queue plus the requests pio is rendering; an llm-d objective header
    names the class (server.objectives)."""
    png = encode(noise_image(64, 48, seed=9))
    held = HeldImage(png)
    image_host.routes["/held-gauge.png"] = held.route
    streams = await _fill_capacity(server)  # 4 running + 2 waiting in vLLM
    queued = asyncio.create_task(client(server, "key-batch").completions.create(
        model=MODEL, prompt="queued", max_tokens=4))
    preparing = asyncio.create_task(client(server, "key-interactive").chat.completions.create(
        model=MODEL, messages=image_message(image_host.base + "/held-gauge.png"),  # type: ignore[arg-type]
        max_tokens=4, extra_headers={"x-llm-d-inference-objective": "chat"}))
    try:
        await asyncio.to_thread(held.wait_fetches, 1)  # admitted: its image is being fetched
        await _until(lambda: metric(scrape(server), "pio_queued_requests") == 1)
        # vLLM's 2 waiting + pio's 1 queued + 1 rendering, without waiting for a step
        assert metric(scrape(server), "vllm:num_requests_waiting") == 4
        assert metric(scrape(server), "pio_preparing_requests",
                      priority_class="interactive") == 1
    finally:
        held.release()
        for stream in streams:
            await stream.close()  # type: ignore[attr-defined]
    answer = await asyncio.wait_for(preparing, 60)
    assert answer.choices[0].finish_reason == "length"
    await asyncio.wait_for(queued, 60)
    text = await wait_idle(server)
    assert metric(text, "vllm:num_requests_waiting") == 0


async def _fit_step_model(server: Server, min_r2: float = 0.5) -> None:
    """Build the state SLO admission prices in: engine steps of different sizes until API
    server 0's tuning loop has a step model good enough to use (`pio_step_model_r2` >=
    tuning.min_r2, 0.5 by default). Polled by rounds of requests, not by time: each round
    adds prefill steps of 16 to 3000 tokens, one request at a time (a step each), to the
    window the model is fitted on."""
    c = client(server)
    for _ in range(40):
        if metric(scrape(server), "pio_step_model_r2") >= min_r2:
            return
        for n in (16, 1000, 3000):
            await c.completions.create(model=MODEL, prompt="the " * n, max_tokens=2)
        await asyncio.sleep(0.5)  # tuning.interval_s: one refit between rounds
    raise AssertionError("no step model with R^2 >= 0.5 after 40 rounds of requests")


async def test_request_whose_slo_no_engine_meets_is_429_slo_infeasible(
        server: Server) -> None:
    """SLO admission over HTTP: with a fitted step model, a request whose
    x-llm-d-slo-ttft-ms (a tighter TTFT target than its class's none) is below any
    predicted TTFT is refused at admission (429, drop reason `slo_infeasible`,
    Retry-After, the prediction in the message); nothing reaches vLLM, and the same request
    without the header is served."""
    await _fit_step_model(server)
    await wait_idle(server)
    before = scrape(server)
    c = client(server)  # key-plain: class standard, no TTFT target of its own
    prompt = [{"role": "user", "content": "hello"}]
    for _ in range(4):  # with two API servers, the requests go to either
        with pytest.raises(openai.RateLimitError) as refused:
            await c.chat.completions.create(
                model=MODEL, messages=prompt, max_tokens=2,  # type: ignore[arg-type]
                extra_headers={"x-llm-d-slo-ttft-ms": "0.001"})
        headers = refused.value.response.headers
        assert headers["x-llm-d-request-dropped-reason"] == "slo_infeasible"
        assert float(headers["Retry-After"]) > 0
        assert "predicted time to first token" in refused.value.message
    after = scrape(server)
    shed = ("pio_admission_events_total", {"priority_class": "standard", "event": "shed"})
    assert metric(after, shed[0], **shed[1]) - metric(before, shed[0], **shed[1]) == 4
    # refused before vLLM: its request counter did not move
    assert metric(after, "vllm:request_success_total") == metric(
        before, "vllm:request_success_total")
    answer = await c.chat.completions.create(model=MODEL, messages=prompt, max_tokens=2)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "length"
