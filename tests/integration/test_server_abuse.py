"""Hostile input against the shared `pio-vllm serve` process: one test per class of input.

Each request gets a 4xx with an OpenAI-style message, none a 5xx, none hangs (every call has
a timeout), no fetch happens outside the policy (a loopback "victim" server counts the
requests that reach it: it must see none), and the server keeps serving after each class.
Only loopback addresses are used; the other ranges are tested as pure functions in
tests/unit/test_url_fetcher.py.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from tests.helpers import encode, http_server, noise_image, serve_bytes
from tests.server_helpers import MODEL, ImageHost, Server, logged_routes

pytestmark = [pytest.mark.engine, pytest.mark.slow]

KEY = {"Authorization": "Bearer key-plain"}
PNG = encode(noise_image(64, 48, seed=3))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


class Victim:
    """A loopback server no request may make pio (or vLLM) connect to."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = int(base.rsplit(":", 1)[1])
        self.hits = 0
        self._lock = threading.Lock()

    def handler(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.hits += 1
        serve_bytes(PNG)(h)


@pytest.fixture(scope="module")
def victim() -> Iterator[Victim]:
    routes: dict[str, Any] = {}
    with http_server(routes) as base:
        v = Victim(base)
        routes["/x.png"] = v.handler
        yield v
    assert v.hits == 0, f"{v.hits} requests reached a destination outside the policy"


class Tally:
    """Every response status of the module; 5xx means a server bug."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, int]] = []

    def record(self, what: str, response: httpx.Response) -> httpx.Response:
        self.statuses.append((what, response.status_code))
        return response


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    server_errors = [s for s in t.statuses if s[1] >= 500]
    assert not server_errors, server_errors
    print(f"abuse suite: {len(t.statuses)} hostile requests, "
          f"{sum(1 for _, c in t.statuses if 400 <= c < 500)} answered 4xx, 0 5xx")


def chat(content: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def post(server: Server, tally: Tally, what: str, body: Any = None, path: str =
         "/v1/chat/completions", headers: dict[str, str] | None = None,
         content: bytes | None = None) -> httpx.Response:
    response = httpx.post(server.base_url + path, json=body if content is None else None,
                          content=content, headers={**KEY, **(headers or {})}, timeout=30)
    return tally.record(what, response)


def assert_refused(response: httpx.Response, status: int, *needles: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    for needle in needles:
        assert needle in error["message"], (needle, error["message"])


def still_serving(server: Server) -> None:
    ok = httpx.post(server.base_url + "/v1/chat/completions", headers=KEY, timeout=60,
                    json=chat([{"type": "image_url", "image_url": {"url": DATA_URL}},
                               {"type": "text", "text": "hi"}]))
    assert ok.status_code == 200, ok.text[:300]


def test_ssrf_spellings_of_loopback_are_refused(server: Server, tally: Tally,
                                                victim: Victim) -> None:
    port = victim.port
    spellings = [f"http://127.0.0.1:{port}/x.png", f"http://[::1]:{port}/x.png",
                 f"http://[::ffff:127.0.0.1]:{port}/x.png", f"http://0.0.0.0:{port}/x.png",
                 f"http://2130706433:{port}/x.png", f"http://0x7f000001:{port}/x.png",
                 f"http://127.1:{port}/x.png", f"http://localhost:{port}/x.png",
                 f"http://LOCALHOST.:{port}/x.png"]
    for url in spellings:
        r = post(server, tally, url, chat([{"type": "image_url", "image_url": {"url": url}}]))
        assert_refused(r, 400, "address")
    r = post(server, tally, "userinfo", chat([{"type": "image_url", "image_url": {
        "url": f"http://localhost@127.0.0.1:{port}/x.png"}}]))
    assert_refused(r, 400, "credentials")
    r = post(server, tally, "invalid ipv4", chat([{"type": "image_url", "image_url": {
        "url": "http://999.1.1.1/x.png"}}]))
    assert_refused(r, 400, "cannot resolve")
    still_serving(server)


def test_redirects_are_checked_on_every_hop(server: Server, tally: Tally, victim: Victim,
                                            image_host: ImageHost) -> None:
    def redirect(location: str) -> Any:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        return route

    image_host.routes["/to-victim"] = redirect(f"http://127.0.0.1:{victim.port}/x.png")
    image_host.routes["/to-localhost"] = redirect(f"http://localhost:{victim.port}/x.png")
    image_host.routes["/to-file"] = redirect("file:///etc/passwd")
    image_host.routes["/loop"] = redirect("/loop")
    for path, needle in (("/to-victim", "loopback"), ("/to-localhost", "loopback"),
                         ("/to-file", "unsupported URL scheme"), ("/loop", "redirects")):
        r = post(server, tally, path, chat([{"type": "image_url", "image_url": {
            "url": image_host.base + path}}]))
        assert_refused(r, 400, needle)
    still_serving(server)


def test_encoded_and_leaking_responses(server: Server, tally: Tally,
                                       image_host: ImageHost) -> None:
    def encoded(h: BaseHTTPRequestHandler) -> None:
        body = gzip.compress(b"\0" * 5_000_000)  # 5 MB expands from ~5 KB
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    image_host.routes["/bomb.gz"] = encoded
    image_host.routes["/secret"] = serve_bytes(b"INTERNAL-SECRET-TOKEN " * 20, "text/plain")
    r = post(server, tally, "gzip", chat([{"type": "image_url", "image_url": {
        "url": image_host.base + "/bomb.gz"}}]))
    assert_refused(r, 400, "gzip-encoded")
    r = post(server, tally, "leak", chat([{"type": "image_url", "image_url": {
        "url": image_host.base + "/secret"}}]))
    assert_refused(r, 400, "image format")
    assert "SECRET" not in r.text
    still_serving(server)


def test_every_route_is_gated_open_or_off(server: Server, tally: Tally) -> None:
    """The route table the server logged at start-up: every route of vLLM's app has a
    policy, and the live server enforces it. A route a future vLLM adds is off by default."""
    table = logged_routes(server.log())
    assert table, "the server logged no route table"
    policies = {p for methods in table.values() for p in methods.values()}
    assert policies <= {"open", "key_only", "gated", "extra", "off"}, policies
    gated = {path for path, m in table.items() if "gated" in m.values()}
    assert gated == {"/v1/chat/completions", "/v1/completions", "/v1/responses",
                     "/v1/messages"}
    for path in ("/tokenize", "/detokenize", "/invocations", "/v1/chat/completions/batch",
                 "/v1/messages/count_tokens"):
        assert set(table[path].values()) == {"off"}, (path, table[path])
    for path, methods in table.items():
        url = server.base_url + path.replace("{response_id}", "resp-x")
        for method, policy in methods.items():
            if method == "HEAD":
                continue
            r = tally.record(f"{method} {path}", httpx.request(method, url, timeout=30,
                                                               json={}))
            if policy == "off":
                assert_refused(r, 404, "is not served")
            elif policy in ("gated", "key_only"):
                assert_refused(r, 401, "API key")
            else:
                assert r.status_code == 200, (path, r.status_code)
            if policy != "off":
                keyed = tally.record(f"{method} {path} keyed", httpx.request(
                    method, url, headers=KEY, timeout=30, json={}))
                assert keyed.status_code not in (401, 404), (path, keyed.status_code)
    still_serving(server)


def test_every_image_shape_goes_through_the_policy(server: Server, tally: Tally,
                                                   victim: Victim) -> None:
    url = f"http://127.0.0.1:{victim.port}/x.png"
    loopback_shapes = {
        "untyped image_url part": chat([{"image_url": {"url": url}}]),
        "untyped image_url string": chat([{"image_url": url}]),
        "input_image part": chat([{"type": "input_image", "image_url": url}]),
        "responses input_image": {"model": MODEL, "max_output_tokens": 2, "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
        "anthropic url source": {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "url", "url": url}}]}]},
        "anthropic tool_result image": {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": [{"type": "image", "source": {
                                              "type": "url", "url": url}}]}]}]},
    }
    paths = {"responses input_image": "/v1/responses", "anthropic url source": "/v1/messages",
             "anthropic tool_result image": "/v1/messages"}
    for name, body in loopback_shapes.items():
        r = post(server, tally, name, body, path=paths.get(name, "/v1/chat/completions"))
        assert_refused(r, 400, "loopback")
    refused_shapes = {
        "uuid only": [{"type": "image_url", "uuid": "someone-elses-image"}],
        "uuid with url": [{"type": "image_url", "image_url": {"url": DATA_URL}, "uuid": "u"}],
        "image_embeds": [{"type": "image_embeds", "image_embeds": "AAAA"}],
        "image_pil": [{"type": "image_pil", "image_pil": None, "uuid": "x"}],
        "audio_url": [{"type": "audio_url", "audio_url": {"url": url}}],
        "video_url": [{"video_url": {"url": url}}],
        "input_audio": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}],
        "file id": [{"type": "input_image", "file_id": "file-123"}],
    }
    for name, content in refused_shapes.items():
        r = post(server, tally, name, chat(content))
        assert_refused(r, 400, "not accepted")
    r = post(server, tally, "prompt_embeds", {"model": MODEL, "prompt": "x",
                                              "prompt_embeds": "AAAA"}, path="/v1/completions")
    assert_refused(r, 400, "prompt embeddings")
    # a schema that names an image_url property is not media
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"image_url": {"type": "string"}}}}}]
    ok = post(server, tally, "tool schema",
              {**chat("hi"), "tools": tools, "tool_choice": "none"})
    assert ok.status_code == 200, ok.text[:300]
    still_serving(server)


def test_priority_abuse(server: Server, tally: Tally) -> None:
    body = chat("hi")
    cases = [
        ({"X-Priority": "99999999999999999999999"}, 400, "unknown priority class"),
        ({"X-Priority": "-5"}, 400, "outside the configured classes"),
        ({"X-Priority": "7"}, 400, "outside the configured classes"),
        ({"X-Priority": "vip"}, 400, "unknown priority class"),
        ({"X-Priority": "0"}, 403, "server.priority_ceiling"),
        ({"X-Vllm-Priority": "-100"}, 400, "outside the configured classes"),
        ({"X-Vllm-Priority": "0"}, 403, "server.priority_ceiling"),
    ]
    for headers, status, needle in cases:
        assert_refused(post(server, tally, str(headers), body, headers=headers), status, needle)
    for value, status in ((0.5, 400), ([0], 400), ("interactive", 403), (-1, 400)):
        r = post(server, tally, f"body {value}", {**body, "priority": value})
        assert r.status_code == status, (value, r.text[:200])
    batch_key = {"Authorization": "Bearer key-batch"}
    r = post(server, tally, "key ceiling", body, headers={**batch_key, "X-Priority": "1"})
    assert_refused(r, 403, "this API key's class")
    still_serving(server)


def test_bodies(server: Server, tally: Tally) -> None:
    r = post(server, tally, "oversized", content=b'{"pad": "' + b"x" * 4_100_000 + b'"}',
             headers={"Content-Type": "application/json"})
    assert_refused(r, 413, "max_body_bytes")
    r = post(server, tally, "malformed", content=b'{"model": "pio:tiny", "messages": [',
             headers={"Content-Type": "application/json"})
    assert_refused(r, 400, "not valid JSON")
    r = post(server, tally, "deep", content=b"[" * 100_000 + b"]" * 100_000,
             headers={"Content-Type": "application/json"})
    assert_refused(r, 400, "nested")
    r = post(server, tally, "deep object", content=b'{"a":' * 200 + b"1" + b"}" * 200,
             headers={"Content-Type": "application/json"})
    assert_refused(r, 400, "max_json_depth")
    r = post(server, tally, "not an object", [1, 2, 3])
    assert_refused(r, 400, "JSON object")
    r = post(server, tally, "bad deadline", chat("hi"), headers={"X-Request-Timeout-S": "nan"})
    assert_refused(r, 400, "X-Request-Timeout-S")
    assert _slow_body_status(server) == 408
    still_serving(server)


def _slow_body_status(server: Server) -> int:
    """Send headers and half a body, then nothing: the gate answers 408 once its body
    deadline (3 s in the shared config) passes, instead of holding the request open."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer key-plain\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_sequences_count_and_are_capped(server: Server, tally: Tally) -> None:
    r = post(server, tally, "n=9", {**chat("hi"), "n": 9})
    assert_refused(r, 400, "max_sequences_per_request=8")
    r = post(server, tally, "best_of", {**chat("hi"), "best_of": 50})
    assert_refused(r, 400, "best_of=50")
    r = post(server, tally, "n=0", {**chat("hi"), "n": 0})
    assert_refused(r, 400, "n=0")
    ok = post(server, tally, "n=2", {**chat("hi"), "n": 2, "temperature": 1.0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    still_serving(server)


async def test_hostile_load_leaves_no_state(server: Server, tally: Tally) -> None:
    """A mixed burst of hostile requests concurrently with good ones: the good ones
    succeed, the server ends idle."""
    async with httpx.AsyncClient(base_url=server.base_url, headers=KEY, timeout=60) as c:
        good = [c.post("/v1/chat/completions", json=chat("hello")) for _ in range(4)]
        bad = [c.post("/v1/chat/completions", content=b"{" * 3000),
               c.post("/tokenize", json={"prompt": "x"}),
               c.post("/v1/chat/completions", json={**chat("x"), "priority": 99}),
               c.post("/v1/chat/completions", json=chat([{"type": "image_url", "uuid": "u"}]))]
        results = await asyncio.gather(*good, *bad)
    for r in results:
        tally.record("burst", r)
    assert [r.status_code for r in results[:4]] == [200] * 4
    assert all(400 <= r.status_code < 500 for r in results[4:])
