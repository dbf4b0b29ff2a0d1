"""The server-mode benchmark client reads SSE per the spec: a chunk whose JSON string holds
U+2028 or U+0085 (random-weight outputs do) is one line, not two."""

from __future__ import annotations

import json

import httpx

from benchmarks.server_mode import sse_chunks


async def test_line_separators_inside_json_strings_do_not_split_events() -> None:
    texts = ["a\u2028b", "c\u0085d", "e\x1cf", "plain"]
    body = "".join(f"data: {json.dumps({'t': t}, ensure_ascii=False)}\n\n" for t in texts)
    body += "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body.encode())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client, \
            client.stream("GET", "http://test/stream") as response:
        got = [chunk["t"] async for chunk in sse_chunks(response)]
    assert got == texts
    # httpx's own line reader splits the first three: the bug this guards against
    assert len(body.encode().decode().splitlines()) > 2 * len(texts) + 2
