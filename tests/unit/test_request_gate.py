"""The request gate in-process (ASGI, no engine): deny by default under any --root-path, keys
on every route but the open ones, body limits, and the media scan's findings."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.intake.image_loader import ImageLoader
from pio_vllm.server.media_scan import MediaKind, scan
from pio_vllm.server.request_gate import APP_STATE_KEY, GateMiddleware, RequestGate
from pio_vllm.server.route_policy import RoutePolicy, classify, route_table, strip_root
from pio_vllm.settings import PioSettings
from tests.helpers import TINY_CONFIG


class Downstream:
    """Stands in for vLLM's routes: records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.classes: list[str] = []  # the class the gate decided, per request

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from pio_vllm.server.request_gate import current_request

        served = current_request.get()
        self.classes.append(served.class_name if served is not None else "-")
        body = b""
        if scope["type"] == "http":
            message = await receive()
            body = message.get("body", b"")
        self.seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def gated_app(root_path: str = "", **server: Any) -> tuple[Any, Downstream]:
    settings = PioSettings.load(TINY_CONFIG, server={
        "api_keys": [{"key": "k1", "tenant": "t"}], "body_timeout_s": 1.0,
        "max_body_bytes": 100_000, **server})
    downstream = Downstream()
    middleware = GateMiddleware(downstream)
    gate = RequestGate(engine=PioEngine(settings), settings=settings,
                       images=ImageLoader(settings.images), root_path=root_path)

    class State:
        pass

    state = State()
    setattr(state, APP_STATE_KEY, gate)

    class App:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            scope["app"] = self
            scope["root_path"] = root_path
            await middleware(scope, receive, send)

    app = App()
    app.state = state  # type: ignore[attr-defined]
    return app, downstream


@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_deny_by_default_under_any_root_path(root_path: str) -> None:
    app, downstream = gated_app(root_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gate") as c:
        for prefix in ("", root_path) if root_path else ("",):
            for path in ("/tokenize", "/invocations", "/v1/chat/completions/batch",
                         "/v1/messages/count_tokens", "/some/future/route", "/docs"):
                r = await c.post(prefix + path, json={})
                assert r.status_code == 404 and "is not served" in r.json()["error"]["message"]
            for path in ("/health", "/metrics", "/version"):
                assert (await c.get(prefix + path)).status_code == 200
            r = await c.get(prefix + "/v1/models")
            assert r.status_code == 401
            r = await c.get(prefix + "/v1/models", headers={"Authorization": "Bearer k1"})
            assert r.status_code == 200
            r = await c.post(prefix + "/v1/chat/completions", json={})
            assert r.status_code == 401  # a key before anything else
    reached = {path for path, _ in downstream.seen}
    assert not any("tokenize" in p or "invocations" in p or "future" in p for p in reached)


async def test_gate_without_configuration_refuses_everything() -> None:
    downstream = Downstream()
    middleware = GateMiddleware(downstream)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["app"] = None
        await middleware(scope, receive, send)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gate") as c:
        assert (await c.get("/health")).status_code == 503
    assert downstream.seen == []


async def test_extra_route_gets_key_and_body_checks() -> None:
    app, downstream = gated_app(extra_routes=["/tokenize"])
    auth = {"Authorization": "Bearer k1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gate") as c:
        assert (await c.post("/tokenize", json={"prompt": "x"})).status_code == 401
        r = await c.post("/tokenize", content=b"x" * 200_000, headers=auth)
        assert r.status_code == 413 and "max_body_bytes=100000" in r.text
        r = await c.post("/tokenize", content=b"[" * 50_000, headers=auth)
        assert r.status_code == 400 and "nested" in r.text
        sent = b'{"prompt":  "hello"}'  # passed on as sent: nothing in it changed
        r = await c.post("/tokenize", content=sent,
                         headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 200
    assert downstream.seen == [("/tokenize", sent)]


def test_route_policies() -> None:
    assert classify("POST", "/v1/chat/completions") is RoutePolicy.GATED
    assert classify("GET", "/v1/chat/completions") is RoutePolicy.OFF
    assert classify("HEAD", "/health") is RoutePolicy.OPEN
    assert classify("GET", "/metrics/") is RoutePolicy.OPEN
    assert classify("GET", "/v1/models") is RoutePolicy.KEY_ONLY
    assert classify("POST", "/tokenize", ["/tokenize"]) is RoutePolicy.EXTRA
    assert classify("WEBSOCKET", "/v1/realtime") is RoutePolicy.OFF
    assert strip_root("/api/v1/models", "/api/") == "/v1/models"
    assert strip_root("/apiv1/models", "/api") == "/apiv1/models"
    table = route_table([("/v1/completions", {"POST"}), ("/metrics", None)])
    assert table == {"/v1/completions": {"POST": RoutePolicy.GATED},
                     "/metrics": {"GET": RoutePolicy.OPEN}}


def test_media_scan_finds_every_shape_and_skips_schemas() -> None:
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://a/1.png"}},
            {"image_url": "http://a/2.png"},
            {"type": "input_image", "image_url": "http://a/3.png"},
            {"type": "image", "source": {"type": "url", "url": "http://a/4.png"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AAAA"}},
            {"type": "image_url", "uuid": "u1"},
            {"type": "audio_url", "audio_url": {"url": "http://a/5.wav"}},
            {"type": "text", "text": "hi"},
        ]}],
        "tools": [{"function": {"parameters": {"properties": {"image_url": {}}}}}],
        "response_format": {"json_schema": {"image_url": {"url": "not media"}}},
        "prompt_embeds": "AAAA",
    }
    refs = scan(body)
    urls = [r.value for r in refs if r.kind is MediaKind.IMAGE_URL]
    assert urls == ["http://a/1.png", "http://a/2.png", "http://a/3.png", "http://a/4.png"]
    assert [r.kind for r in refs].count(MediaKind.ANTHROPIC_BASE64) == 1
    refused = sorted(r.detail for r in refs if r.kind is MediaKind.REFUSED)
    assert any("uuid" in d for d in refused) and "audio" in refused
    assert "prompt embeddings" in refused
    for ref in refs:
        if ref.kind is MediaKind.IMAGE_URL:
            ref.replace_url("data:image/png;base64,QUJD")
    content = body["messages"][0]["content"]  # type: ignore[index]
    assert content[0]["image_url"]["url"].startswith("data:")
    assert content[1]["image_url"].startswith("data:")
    assert content[3]["source"] == {"type": "base64", "media_type": "image/png",
                                    "data": "QUJD"}


async def test_llm_d_objectives_name_the_class_and_slo_headers_are_checked() -> None:
    """`x-llm-d-inference-objective` (else the legacy GIE header) names the class through
    server.objectives, ahead of X-Priority and never above the key's ceiling; an unknown
    objective is a 400 naming the configured ones; per-request SLO headers must be positive
    milliseconds."""
    app, downstream = gated_app(
        objectives={"chat": "interactive", "offline": "batch"}, priority_ceiling="interactive")
    body = {"model": "pio:tiny", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": "Bearer k1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gate") as c:
        async def post(**headers: str) -> httpx.Response:
            return await c.post("/v1/chat/completions", json=body, headers={**auth, **headers})

        assert (await post(**{"x-llm-d-inference-objective": "offline",
                              "X-Priority": "interactive"})).status_code == 200
        assert (await post(**{"x-gateway-inference-objective": "chat"})).status_code == 200
        r = await post(**{"x-llm-d-inference-objective": "premium"})
        assert r.status_code == 400 and "'premium' is not configured" in r.text
        assert "['chat', 'offline']" in r.text and r.json()["error"]["param"] == "priority"
        for bad in ("0", "-5", "soon"):
            r = await post(**{"x-llm-d-slo-ttft-ms": bad})
            assert r.status_code == 400 and "positive number of milliseconds" in r.text, bad
        assert (await post(**{"x-llm-d-slo-ttft-ms": "250",
                              "x-llm-d-slo-tpot-ms": "40"})).status_code == 200
    assert downstream.classes == ["batch", "interactive", "standard"]


def test_a_shed_response_names_its_reason_for_llm_d() -> None:
    from pio_vllm.errors import RequestRejectedError
    from pio_vllm.server.http_errors import DROPPED_REASON_HEADER, error_response

    response = error_response(RequestRejectedError("shed", 2.5, "slo_infeasible"))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.headers[DROPPED_REASON_HEADER] == "slo_infeasible"
