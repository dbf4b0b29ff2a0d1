"""The server's last moments: SIGTERM drains the shared server (this module runs after the
other server modules). An engine death is tested on a replica (test_replicas.py), whose
engine is discarded anyway, rather than on a server started for it."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.helpers import FILL_TOKENS
from tests.server_helpers import MODEL, Server

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_sigterm_drains_then_exits_0(server: Server) -> None:
    """Stops the shared server (a later user of the `server` fixture gets a new one)."""
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="key-plain", max_retries=0)
    short = c.completions.create(model=MODEL, prompt="a", max_tokens=60, stream=True,
                                 extra_body={"ignore_eos": True})
    long = c.completions.create(model=MODEL, prompt="b", max_tokens=FILL_TOKENS, stream=True,
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
        for _ in long:  # FILL_TOKENS outlast drain_timeout_s=4: aborted with a clear error
            pass
    assert server.proc.wait(60) == 0, server.log()[-3000:]
