"""The server's last moments: SIGTERM drains the shared server (this module runs after the
other server modules), and an engine death ends streams with an error (its own server)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.server_helpers import MODEL, Server, start_server, write_config

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_sigterm_drains_then_exits_0(server: Server) -> None:
    """Stops the shared server (a later user of the `server` fixture gets a new one)."""
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="key-plain", max_retries=0)
    short = c.completions.create(model=MODEL, prompt="a", max_tokens=60, stream=True,
                                 extra_body={"ignore_eos": True})
    long = c.completions.create(model=MODEL, prompt="b", max_tokens=4000, stream=True,
                                extra_body={"ignore_eos": True})
    first_short, first_long = next(iter(short)), next(iter(long))
    assert first_short and first_long
    server.proc.send_signal(15)
    deadline = time.monotonic() + 10
    while "draining:" not in server.log():  # pio logs the drain's start
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.05)
    refused = httpx.post(server.base_url + "/v1/completions", headers={
        "Authorization": "Bearer key-plain"}, json={"model": MODEL, "prompt": "x"})
    assert refused.status_code == 503, refused.text
    finish = [ch.choices[0].finish_reason for ch in short if ch.choices]
    assert finish[-1] == "length"  # drained: finished normally
    with pytest.raises(openai.APIError, match="shut down"):
        for _ in long:  # 4000 tokens outlast drain_timeout_s=4: aborted with a clear error
            pass
    assert server.proc.wait(60) == 0, server.log()[-3000:]


def test_engine_death_ends_streams_and_health_503(tmp_path: Path) -> None:
    config = write_config(tmp_path / "server.yaml",
                          vllm_env={"VLLM_CPU_KVCACHE_SPACE": "1",
                                    "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    srv = start_server(config, tmp_path / "server.log")
    try:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        stream = c.completions.create(model=MODEL, prompt="go", max_tokens=3500, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(stream))
        cores = [p for p in psutil.Process(srv.proc.pid).children(recursive=True)
                 if "EngineCor" in " ".join(p.cmdline()) + p.name()]
        assert cores, [p.name() for p in psutil.Process(srv.proc.pid).children(recursive=True)]
        killed_at = time.monotonic()
        for p in cores:
            p.kill()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert time.monotonic() - killed_at < 5.0
        assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 503
    finally:
        srv.stop()
