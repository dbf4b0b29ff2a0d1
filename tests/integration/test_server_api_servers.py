"""`pio-vllm serve --api-server-count 2`: the server tests that `serve` passes, against two
API-server processes on one socket in front of one EngineCore, and the node's one admission
order (capacity, queue bounds and priority across both processes).

The server here has the shared server's config (server_helpers.shared_server_config): a
capacity of 6 sequences (max_num_seqs 4 + lookahead 2) and a batch queue of 2, for the node.
Without the node ledger each process would admit 6 and queue 2: the tests below that fill
the capacity would then see their queued request admitted and fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import FILL_TOKENS
from tests.integration.test_server import (  # noqa: F401  (collected here, on this server)
    _until,
    scrape,
    test_api_keys,
    test_bad_inputs_get_4xx_and_server_keeps_serving,
    test_chat_with_data_url_image_streaming_and_not,
    test_client_leaving_while_queued_leaves_the_queue,
    test_deadline_header_gives_504,
    test_models_health_and_metrics,
    test_priority_from_body_header_and_key,
    test_queued_request_is_not_rendered_while_a_later_urgent_one_goes_first,
    test_request_whose_slo_no_engine_meets_is_429_slo_infeasible,
    test_shed_is_429_with_retry_after,
    test_waiting_gauge_counts_what_pio_holds_and_objectives_name_classes,
    wait_idle,
)
from tests.integration.test_server_abuse import (  # noqa: F401
    tally,
    test_bodies,
    test_priority_abuse,
    test_sequences_count_and_are_capped,
)
from tests.server_helpers import (
    MODEL,
    ImageHost,
    Server,
    launch_server,
    metric,
    shared_server_config,
    wait_healthy,
)

# each test takes seconds; the bound keeps a broken node ledger (a test waiting on a queue
# that never forms, a fill stream that is never refused) from holding the suite for 10 min
pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, image_host: ImageHost) -> Iterator[Server]:
    """This module's server: the shared server's config with two API-server processes."""
    tmp: Path = tmp_path_factory.mktemp("api-servers")
    config = shared_server_config(tmp / "server.yaml", image_host.port)
    running = wait_healthy(launch_server(config, tmp / "server.log", "--api-server-count", "2"))
    yield running
    assert running.stop() == 0, running.log()[-3000:]
    log = running.log()
    assert "API server 0 of 2" in log and "API server 1 of 2" in log


async def _open_fill(http: httpx.AsyncClient, i: int) -> tuple[int, str | None, object]:
    """A long batch completion stream: (status, the API server that answered, response)."""
    request = http.build_request("POST", "/v1/completions", headers={
        "Authorization": "Bearer key-batch"}, json={
        "model": MODEL, "prompt": f"fill {i}", "max_tokens": FILL_TOKENS, "stream": True,
        "ignore_eos": True})
    response = await http.send(request, stream=True)
    return response.status_code, response.headers.get("x-pio-api-server"), response


async def test_a_flood_on_both_processes_is_admitted_by_one_capacity_and_one_queue(
        server: Server) -> None:
    """12 batch streams at once, spread over both processes: the node admits 6 (its
    capacity), queues 2 (the batch class's queue) and refuses 4 with 429, whichever process
    each one reached; an interactive request still gets through at once."""
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
        opened = [asyncio.create_task(_open_fill(http, i)) for i in range(12)]
        await _until(lambda: sum(t.done() for t in opened) >= 10, timeout_s=60)
        await _until(lambda: metric(scrape(server), "pio_queued_requests",
                                    priority_class="batch") == 2, timeout_s=60)
        done = [t.result() for t in opened if t.done()]
        statuses = sorted(status for status, _, _ in done)
        assert statuses == [200] * 6 + [429] * 4, statuses
        text = scrape(server)
        assert metric(text, "pio_running_requests", priority_class="batch") == 6
        assert metric(text, "vllm:num_requests_running") <= 4
        answered_by = {who for _, who, _ in done}
        assert answered_by == {"0", "1"}, f"one process took every connection: {answered_by}"
        urgent = await http.post("/v1/completions", headers={
            "Authorization": "Bearer key-interactive"}, json={
            "model": MODEL, "prompt": "now", "max_tokens": 4})
        assert urgent.status_code == 200
        assert metric(scrape(server), "pio_queued_requests", priority_class="batch") == 2
        for task in opened:  # the two queued ones leave first, then the streams close
            if not task.done():
                task.cancel()
        for result in await asyncio.gather(*opened, return_exceptions=True):
            if isinstance(result, tuple):
                await result[2].aclose()  # type: ignore[attr-defined]
    await wait_idle(server, timeout_s=30)
