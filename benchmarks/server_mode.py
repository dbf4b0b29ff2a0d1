"""Server mode of the A/B harness: `pio-vllm serve` vs plain vLLM's OpenAI server.

Both servers start from the same settings file: pio's with `python -m pio_vllm serve
--config FILE`, plain vLLM's with `python -m vllm.entrypoints.openai.api_server` and the
file's `engine` section as flags (same model path, same engine arguments). One async httpx
client replays the workload against /v1/chat/completions (streaming, usage included, images
as data URLs, priority as the X-Priority header on pio and the body's `priority` level on
vLLM) and measures TTFT, ITL, TPOT and end-to-end latency per request. A 429 from pio counts
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
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BenchRequest,
    Slo,
    _replay,
    _tpot,
    derive_config,
    make_images,
    summarise,
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, settings_path: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    from pio_vllm.engine.vllm_backend import resolve_model
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    port = free_port()
    env = {**os.environ, **settings.vllm_env}
    if kind == "pio":
        # The benchmark client is trusted to name any class (no API keys are configured):
        # lift server.priority_ceiling to the highest class, as an operator would for it.
        top = min(settings.priority_classes.items(), key=lambda kv: kv[1].level)[0]
        trusted = derive_config(Path(settings_path), log_path.with_suffix(".yaml"),
                                server={**settings.server.model_dump(mode="json",
                                                                     exclude={"api_keys"}),
                                        "priority_ceiling": top})
        cmd = [sys.executable, "-m", "pio_vllm", "serve", "--config", str(trusted)]
    else:
        model = resolve_model(settings)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", settings.model,
               *engine_flags({k: v for k, v in settings.engine.items()
                              if k != "scheduler_cls"})]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited {proc.returncode}; log: {log_path}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
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
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Replay `work` against a running server; `headers` go with every request (an API
    key, for instance)."""
    import httpx

    images = {rid: _data_urls(imgs) for rid, imgs in make_images(work).items()}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
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
            if kind == "pio":
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
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
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

        # One warm-up request per side (the in-process harness does the same): the first
        # request on a fresh server pays one-time costs the scenario does not measure. Its
        # image is not one of the workload's, so no cache is primed for the measured run.
        warm_image = make_images([BenchRequest("warm", "standard", 1, "", 4, 0.0,
                                               ((64, 64, 12345),))])["warm"]
        warm = await client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_urls(warm_image)[0]}},
                {"type": "text", "text": "warm up"}]}]})
        warm.raise_for_status()
        rows, wall = await _replay(work, submit, concurrency)
        metrics = (await client.get("/metrics")).text
    result = summarise(rows, wall, slo) | {"rows": rows}
    result["shed_429"] = sum(1 for r in rows if str(r["error"]).startswith("HTTP 429"))
    # Preemptions are not visible per request over HTTP: the server's counters say.
    result["preemptions"] = _counter(metrics, "pio_admission_events_total",
                                     'event="preempted"')
    result["engine_preemptions"] = _counter(metrics, "vllm:num_preemptions_total")
    if kind == "pio":
        result["admission_events"] = {
            event: int(_counter(metrics, "pio_admission_events_total", f'event="{event}"')
                       or 0)
            for event in ("admitted", "deferred", "shed", "expired", "slo_met", "slo_missed")}
        result["step_model"] = {
            name: _counter(metrics, f"pio_step_model_{name}")
            for name in ("base_seconds", "seconds_per_token", "seconds_per_vision_token",
                         "r2")}
    return result


def _counter(text: str, name: str, label: str = "") -> float | None:
    """Sum of a Prometheus counter's samples (with `label` if given); None if absent."""
    values = [float(line.rpartition(" ")[2]) for line in text.splitlines()
              if line.startswith(name) and label in line and not line.startswith("#")]
    return sum(values) if values else None


def run_server_side(kind: str, settings_path: str, work: list[BenchRequest],
                    slo: Slo | None, concurrency: int | None, log_dir: Path) -> dict[str, Any]:
    from pio_vllm.settings import PioSettings

    model = PioSettings.load(settings_path).model
    proc, base = start(kind, settings_path, log_dir / f"{kind}-server.log")
    try:
        return asyncio.run(replay(kind, base, model, work, slo, concurrency))
    finally:
        stop(proc)
