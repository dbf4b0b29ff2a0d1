"""Server mode of the A/B harness: `pio-vllm serve` vs plain vLLM's OpenAI server.

Both servers start from the same settings file: pio's with `python -m pio_vllm serve
--config FILE`, plain vLLM's with `python -m vllm.entrypoints.openai.api_server` and the
file's `engine` section as flags (same model path, same engine arguments). One async httpx
client replays the workload against /v1/chat/completions (streaming, usage included, images
as data URLs, priority as the X-Priority header on pio and the body's `priority` level on
vLLM; the stream read per the SSE spec) and measures TTFT, ITL, TPOT and end-to-end latency
per request. A 429 from pio counts
as shed (with its Retry-After), not as an error of the server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ADMISSION_EVENTS,
    BenchRequest,
    Slo,
    _replay,
    _tpot,
    derive_config,
    make_images,
    summarise,
    warm_up,
    warmup_work,
)


def engine_flags(engine: dict[str, Any]) -> list[str]:
    """vLLM CLI flags for an AsyncEngineArgs dict (model excluded)."""
    flags: list[str] = []
    for key, value in engine.items():
        if key == "model" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                flags.append(flag)
            elif key not in ("disable_log_stats",):
                flags.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def api_servers(settings: Any) -> int:
    """API-server processes a config asks for (`engine.api_server_count`, a `vllm serve`
    flag: both sides get it)."""
    return int(settings.engine.get("api_server_count") or 1)


def free_port() -> int:
    return free_port_block(1)


def free_port_block(count: int) -> int:
    """The first of `count` consecutive loopback ports that are free now, chosen below the
    kernel's ephemeral range, so that no outgoing connection or bind(0) elsewhere takes one
    of them between this check and the server binding it (or rebinding it on a restart)."""
    import random
    import socket

    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for _ in range(200):
        first = random.randrange(10000, low - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free loopback ports in 10000..{low}")


def start(kind: str, settings_path: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    from pio_vllm.engine.vllm_backend import resolve_model
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    port = free_port()
    env = {**os.environ, **settings.vllm_env}
    also: str | None = None
    listen = ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    if kind in ("pio", "pio-router"):
        # The benchmark client is trusted to name any class (no API keys are configured):
        # lift server.priority_ceiling to the highest class, as an operator would for it.
        top = min(settings.priority_classes.items(), key=lambda kv: kv[1].level)[0]
        trusted = derive_config(Path(settings_path), log_path.with_suffix(".yaml"),
                                server={**settings.server.model_dump(mode="json",
                                                                     exclude={"api_keys"}),
                                        "priority_ceiling": top})
        if kind == "pio":
            cmd = [sys.executable, "-m", "pio_vllm", "serve", "--config", str(trusted), *listen]
        else:
            # one replica behind vllm-router: the router hop's cost, against "pio" going
            # direct; healthy once the replica (port + 1) answers too
            log_dir = log_path.with_suffix("")
            log_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pio_vllm", "serve-replicas", "--replicas", "1",
                   "--config", str(trusted), "--log-dir", str(log_dir), "--port", str(port),
                   "--policy", "round_robin"]  # power_of_two needs two workers
            also = f"http://127.0.0.1:{port + 1}"
    else:
        model = resolve_model(settings)
        # several API servers: vLLM's `vllm serve` (run_multi_api_server), see plain_serve
        entry = ("benchmarks.plain_serve" if api_servers(settings) > 1
                 else "vllm.entrypoints.openai.api_server")
        cmd = [sys.executable, "-m", entry, "--model", model,
               "--served-model-name", settings.model,
               *engine_flags({k: v for k, v in settings.engine.items()
                              if k != "scheduler_cls"}), *listen]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, _wait_healthy(proc, kind, f"http://127.0.0.1:{port}", log_path, also)


def _wait_healthy(proc: subprocess.Popen[bytes], kind: str, base: str, log_path: Path,
                  also: str | None = None) -> str:
    """`base` once /health answers 200 there (and at `also`: the replica behind a router)."""
    import httpx

    def ok(url: str) -> bool:
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited {proc.returncode}; log: {log_path}")
        if ok(base) and (also is None or ok(also)):
            return base
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{kind} server not healthy in 300 s; log: {log_path}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _data_urls(images: list[Any]) -> list[str]:
    urls = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


async def replay(kind: str, base: str, model: str, work: list[BenchRequest],
                 slo: Slo | None, concurrency: int | None,
                 headers: dict[str, str] | None = None, wait_for_model: float | None = 0.5,
                 sample_running: bool = False) -> dict[str, Any]:
    """Replay `work` against a running server after the shared warm-up; `headers` go with
    every request (an API key, for instance); `wait_for_model`: give pio's SLO admission up
    to 15 s after the warm-up to fit a step model with at least this R^2 (the server's
    tuning.min_r2; None: do not wait, as for a config without SLO targets);
    `sample_running`: read /metrics every 100 ms through the run and report the most
    requests vLLM ran and pio held past its queue at once (several API servers: the node's
    capacity is what is checked)."""
    import httpx

    warm = [r for wave in warmup_work(work) for r in wave]
    images = {rid: _data_urls(imgs) for rid, imgs in make_images(work + warm).items()}
    # Idle connections are dropped after 2 s, before the server's keep-alive timeout (5 s in
    # uvicorn and vLLM): reusing one the server is closing fails the request with a
    # ReadError (seen once, after the warm-up's wait for pio's step model).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits,
                                 headers=headers) as client:
        async def submit(req: BenchRequest, t_arrival: float) -> dict[str, Any]:
            content: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": u}} for u in images[req.request_id]]
            content.append({"type": "text", "text": req.text})
            body: dict[str, Any] = {
                "model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": req.max_tokens, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
            headers = {}
            if kind in ("pio", "pio-router"):
                headers["X-Priority"] = req.priority_class
            else:
                body["priority"] = req.level
            row: dict[str, Any] = {"request_id": req.request_id,
                                   "priority_class": req.priority_class, "ok": False,
                                   "ttft_s": None, "output_tokens": 0, "itl_s": [],
                                   "first_at": None, "done_at": None, "error": None}
            last = None
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers=headers) as resp:
                predicted = resp.headers.get("x-pio-predicted-ttft-s")
                row["predicted_ttft_s"] = float(predicted) if predicted else None
                if resp.status_code != 200:
                    await resp.aread()
                    row["error"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    row["e2e_s"] = time.perf_counter() - t_arrival
                    return row
                async for chunk in sse_chunks(resp):
                    if "error" in chunk:
                        row["error"] = str(chunk["error"])[:200]
                        break
                    now = time.perf_counter()
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        if row["ttft_s"] is None:
                            row["ttft_s"] = now - t_arrival
                            row["first_at"] = now
                        elif last is not None:
                            row["itl_s"].append(now - last)
                        last = now
                    if chunk.get("usage"):
                        row["output_tokens"] = chunk["usage"]["completion_tokens"]
            done = time.perf_counter()
            row.update(ok=row["error"] is None, done_at=done, e2e_s=done - t_arrival,
                       tpot_s=_tpot(row["first_at"], done, row["output_tokens"]))
            return row

        min_r2 = wait_for_model if kind == "pio" else None
        # the same warm-up as in-process (harness.warmup_work); pio's last wave waits for
        # its step model
        await warm_up(work, submit, ready=None if min_r2 is None
                      else lambda: _model_fitted(client, min_r2))
        metrics_before = (await client.get("/metrics")).text
        peaks: dict[str, float] = {}
        sampler = asyncio.create_task(_sample_running(client, peaks)) if sample_running \
            else None
        try:
            rows, wall = await _replay(work, submit, concurrency)
        finally:
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
        metrics = (await client.get("/metrics")).text
    result = summarise(rows, wall, slo) | {"rows": rows}
    result["shed_429"] = sum(1 for r in rows if str(r["error"]).startswith("HTTP 429"))
    # Preemptions are not visible per request over HTTP: the server's counters say.
    def during(name: str, label: str = "") -> float:
        """A counter's increase over the run (a series not yet exported counts 0)."""
        return (_counter(metrics, name, label) or 0.0) - (
            _counter(metrics_before, name, label) or 0.0)

    result["preemptions"] = during("pio_admission_events_total", 'event="preempted"')
    result["engine_preemptions"] = during("vllm:num_preemptions_total")
    if sample_running:
        result["peak_running"] = peaks
    if kind == "pio":
        result["server_timings"] = server_timings(metrics_before, metrics, rows)
        result["admission_events"] = {
            event: int(during("pio_admission_events_total", f'event="{event}"'))
            for event in ADMISSION_EVENTS}
        result["step_model"] = {
            name: _counter(metrics, f"pio_step_model_{name}")
            for name in ("base_seconds", "seconds_per_token", "seconds_per_vision_token",
                         "r2")}
    return result


async def sse_chunks(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an OpenAI streaming response, read per the SSE spec (httpx-sse):
    lines end at CR, LF or CRLF only. httpx's `aiter_lines` also splits on U+2028, U+0085
    and the other separators `str.splitlines` knows, which random-weight outputs put inside
    JSON strings: a run died on `JSONDecodeError: Unterminated string`."""
    from httpx_sse import EventSource

    async for event in EventSource(response).aiter_sse():
        if event.data and event.data != "[DONE]":
            yield json.loads(event.data)


def server_timings(before: str, after: str, rows: list[dict[str, Any]]
                   ) -> dict[str, dict[str, float | int | None]]:
    """Per class, what pio's server measured over the run (its histograms' sums and counts:
    time in pio's queue, and arrival at pio's gate to the first token) beside the client's
    mean TTFT for the same requests: the difference is the time before the gate (the API
    server receiving and parsing the request) and the first chunk's way back."""
    out: dict[str, dict[str, float | int | None]] = {}
    for cls in sorted({r["priority_class"] for r in rows}):
        label = f'priority_class="{cls}"'

        def delta(name: str, label: str = label) -> float:
            return (_counter(after, name, label) or 0.0) - (_counter(before, name, label)
                                                            or 0.0)

        n_ttft = int(delta("pio_time_to_first_token_seconds_count"))
        n_wait = int(delta("pio_queue_wait_seconds_count"))
        client = [r["ttft_s"] for r in rows
                  if r["priority_class"] == cls and r["ok"] and r["ttft_s"] is not None]
        out[cls] = {
            "server_ttft_mean_s": round(delta("pio_time_to_first_token_seconds_sum") / n_ttft,
                                        4) if n_ttft else None,
            "server_queue_wait_mean_s": round(delta("pio_queue_wait_seconds_sum") / n_wait, 4)
            if n_wait else None,
            "client_ttft_mean_s": round(sum(client) / len(client), 4) if client else None,
            "requests": n_ttft,
        }
    return out


async def _model_fitted(client: Any, min_r2: float, timeout_s: float = 15.0) -> None:
    """Wait (bounded) until pio exports a step-time model good enough to price with (R^2
    at least the config's tuning.min_r2: SLO admission's own test)."""
    deadline = time.monotonic() + timeout_s
    r2 = None
    while time.monotonic() < deadline:
        r2 = _counter((await client.get("/metrics")).text, "pio_step_model_r2")
        if r2 is not None and r2 >= min_r2:
            return
        await asyncio.sleep(0.5)
    print(f"warning: pio's step-time model has R^2 {r2} < {min_r2} after the warm-up; SLO "
          "admission starts inactive", file=sys.stderr)


def _counter(text: str, name: str, label: str = "") -> float | None:
    """Sum of a Prometheus counter's samples (with `label` if given); None if absent."""
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line.startswith(name) and label in line and not line.startswith("#")]
    return sum(values) if values else None


async def _sample_running(client: Any, peaks: dict[str, float]) -> None:
    """The most vLLM ran (`vllm:num_requests_running`) and pio held past its queue
    (`pio_running_requests`, summed over classes and processes) in any sample."""
    names = {"vllm_running": "vllm:num_requests_running",
             "pio_past_queue": "pio_running_requests"}
    samples = 0
    while True:
        text = (await client.get("/metrics")).text
        samples += 1
        for key, name in names.items():
            labelled = _counter(text, name + "{")
            value = labelled if labelled is not None else _counter(text, name + " ")
            if value is not None:
                peaks[key] = max(peaks.get(key, 0.0), value)
        peaks["samples"] = samples
        await asyncio.sleep(0.1)


def run_server_side(kind: str, settings_path: str, work: list[BenchRequest],
                    slo: Slo | None, concurrency: int | None, log_dir: Path,
                    sample_running: bool = False) -> dict[str, Any]:
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    proc, base = start(kind, settings_path, log_dir / f"{kind}-server.log")
    try:
        return asyncio.run(replay(kind, base, settings.model, work, slo, concurrency,
                                  wait_for_model=settings.tuning.min_r2
                                  if settings.slo_admission_on() else None,
                                  sample_running=sample_running))
    finally:
        stop(proc)
