"""RequestGate: pio's checks and queue in front of vLLM's routes (frontend process).

Deny by default (`route_policy.py`): a request to a route pio does not serve is a 404
before vLLM sees it. For the routes it serves, in order, before vLLM parses anything:

1. API key (when `server.api_keys` is set): a missing or unknown key is a 401.
2. Body: at most `server.max_body_bytes` (413), complete within `server.body_timeout_s`
   (408), a JSON object nested at most `server.max_json_depth` deep (400).
3. Priority (generation routes): the `X-Priority` header, vLLM's `X-Vllm-Priority` header,
   the body's `priority`, the key's class, else the default class; a configured class name
   or a level within the classes' range (400 otherwise), never above the key's class or, for
   requests whose key names none, `server.priority_ceiling` (403). vLLM's header is
   dropped and the engine call carries the resolved level (`PioEngineClient`); a class name
   in the body's `priority` becomes that level there, as vLLM accepts integers only.
4. Deadline: the `X-Request-Timeout-S` header (seconds) bounds queueing and generation (504).
5. Sequences: n / best_of up to `server.max_sequences_per_request`; they count as that many
   admission slots.
6. Admission: the request waits in pio's queue, in priority order, holding only its bounded
   body (429 with Retry-After when shed, 504 when its deadline passes there; a client that
   disconnects leaves the queue). Nothing below runs for it before it leaves the queue: an
   urgent request never waits behind a flood's image fetching, chat templating or image
   processing, which vLLM's serving layer does for each request in arrival order.
7. Media (`media_scan.py` finds every image reference in any content shape): http(s) URLs
   are fetched by pio under its SSRF policy (`intake/url_fetcher.py`), file URLs only under
   `images.allowed_local_dirs`, and handed to vLLM inline; inline images are size- and
   header-checked (decompression bombs refused before any decode); audio, video,
   embeddings, file ids and uuid-only cache references are refused. vLLM itself is started
   with an allow-list that matches no host, so it fetches nothing.

What the gate decided travels to `PioEngineClient` in a context variable (`current_request`);
an admission place that no engine call took over is released when the response ends.
Errors are OpenAI-style bodies from `http_errors.py`.

Size: the checks above run in this order on one request's ASGI scope and body, each a
short method of the gate; the route and media policies are their own modules (~620 lines).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from pio_vllm.admission.controller import Release, Ticket
from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import (
    BodyTimeoutError,
    EngineNotRunningError,
    ImageSourceError,
    InvalidRequestError,
    PayloadTooLargeError,
    PioError,
    PriorityNotAllowedError,
    RouteNotServedError,
    TooManyImagesError,
    UnauthorizedError,
    UnknownPriorityError,
)
from pio_vllm.intake.cost_estimate import estimate_payload
from pio_vllm.intake.image_loader import ImageLoader
from pio_vllm.server.http_errors import error_response
from pio_vllm.server.media_scan import MediaKind, MediaRef, scan
from pio_vllm.server.route_policy import PIO_PATHS, RoutePolicy, classify, strip_root
from pio_vllm.settings import ImageSettings, PioSettings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

VLLM_PRIORITY_HEADER = "x-vllm-priority"  # vLLM 0.32 GenerateBaseServing.PRIORITY_HEADER
# SLO admission's TTFT prediction for the request (seconds from arrival), on its response.
PREDICTED_TTFT_HEADER = "x-pio-predicted-ttft-s"
# llm-d's router (and the Gateway API Inference Extension before it): the request's objective
# and per-request SLO (milliseconds)
OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
SLO_TTFT_HEADER = "x-llm-d-slo-ttft-ms"
SLO_TPOT_HEADER = "x-llm-d-slo-tpot-ms"


@dataclass
class ServedRequest:
    """What the gate decided for one HTTP request; read by PioEngineClient."""

    level: int
    class_name: str
    tenant: str | None
    deadline_at: float | None  # monotonic
    ticket: Ticket | None = None  # admission place left to use, until an engine call takes it
    predicted_ttft_s: float | None = None  # SLO admission's prediction at the grant

    def take_ticket(self) -> Ticket | None:
        ticket, self.ticket = self.ticket, None
        return ticket


current_request: ContextVar[ServedRequest | None] = ContextVar(
    "pio_current_request", default=None)


def gate_image_loader(settings: PioSettings) -> ImageLoader:
    """The gate's image loader: the server never reads the local disk unless an allowed
    directory is configured. The launcher owns (and closes) it."""
    image_settings: ImageSettings = settings.images.model_copy(
        update={"allow_local_files": settings.images.allowed_local_dirs is not None})
    return ImageLoader(image_settings)


class GateMiddleware:
    """The ASGI middleware vLLM builds from `--middleware` (vLLM 0.32.0
    `init_entrypoints_middleware`: the import path, the next app as the only argument). It
    runs the RequestGate the launcher put on the app's state (`APP_STATE_KEY`); without one
    it refuses every request (503) rather than serve ungated."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        gate = getattr(getattr(scope.get("app"), "state", None), APP_STATE_KEY, None)
        if gate is None:
            await _refuse(scope, receive, send, EngineNotRunningError(
                "pio's request gate is not configured; the server refuses requests"))
            return
        await gate.serve(scope, receive, send, self.app)


# Where the launcher puts the RequestGate: `app.state.pio_request_gate`.
APP_STATE_KEY = "pio_request_gate"
API_SERVER_HEADER = "x-pio-api-server"  # which of N API-server processes answered
GATE_MIDDLEWARE = f"{__name__}.GateMiddleware"


class RequestGate:
    """pio's checks and queue in front of vLLM's routes, for one server. While
    `draining()` is true (SIGTERM), new requests get 503."""

    def __init__(self, *, engine: PioEngine, settings: PioSettings, images: ImageLoader,
                 root_path: str = "", draining: Callable[[], bool] = lambda: False,
                 registry: Any | None = None, api_server: int | None = None) -> None:
        """`registry`: where `pio_requests_total{tenant, priority_class, status}` goes (the
        server's Prometheus registry); None: not exported. `api_server`: this process's
        index among several API servers (`--api-server-count N`): every response names it
        in `x-pio-api-server`."""
        self._draining = draining
        self._requests = None if registry is None else _request_counter(registry)
        self._engine = engine
        self._settings = settings
        self._server = settings.server
        self._root_path = root_path
        self._keys = {
            hashlib.sha256(k.key.get_secret_value().encode()).digest(): k
            for k in settings.server.api_keys or []
        }
        self._images = images
        self._ids = itertools.count()
        self._api_server = None if api_server is None else str(api_server)

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: Any) -> None:
        """Check `scope`'s request and pass it to `app` (vLLM's routes) when admitted."""
        path = strip_root(scope.get("path", ""), self._root_path)
        method = "WEBSOCKET" if scope["type"] == "websocket" else scope.get("method", "")
        if self._api_server is not None:
            send = _with_header(send, API_SERVER_HEADER, self._api_server)
        if method == "OPTIONS":  # CORS preflight: vLLM's CORS middleware answers it
            await app(scope, receive, send)
            return
        policy = classify(method, path, self._server.extra_routes)
        if policy is RoutePolicy.OPEN and path in PIO_PATHS:
            await self._pio_route(path)(scope, receive, send)
            return
        if policy is RoutePolicy.OPEN:
            await app(scope, receive, send)
            return
        outcome = _Outcome()
        try:
            await self._serve_gated(scope, receive, _recording_status(send, outcome), app,
                                    policy, method, path, outcome)
        finally:
            self._count(method, path, outcome)

    async def _serve_gated(self, scope: Scope, receive: Receive, send: Send, app: Any,
                           policy: RoutePolicy, method: str, path: str,
                           outcome: _Outcome) -> None:
        served: ServedRequest | None = None
        try:
            if policy is RoutePolicy.OFF:
                raise RouteNotServedError(
                    f"{method} {path} is not served: pio serves POST /v1/chat/completions, "
                    "/v1/completions, /v1/responses, /v1/messages, GET /v1/models, /health, "
                    "/metrics, /version (an operator may add routes with server.extra_routes)")
            tenant, key_class = self._authenticate(scope)
            outcome.tenant = tenant or ANONYMOUS
            if self._draining():
                raise EngineNotRunningError("the server is shutting down; retry elsewhere")
            if policy is RoutePolicy.KEY_ONLY or method in ("GET", "HEAD", "WEBSOCKET"):
                level, name = self._engine.resolve_priority(key_class)
                served = ServedRequest(level, name, tenant, None)
            else:
                body = await self._read_body(receive)
                payload = self._parse(body)
                before = payload.get("priority")
                refs = self._media_refs(payload)  # refusals cost no queue place
                if policy is RoutePolicy.GATED:
                    served = await self._admit(scope, receive, payload, refs, tenant,
                                               key_class)
                    if served is None:  # the client left while queued
                        return
                else:
                    level, name = self._engine.resolve_priority(key_class)
                    served = ServedRequest(level, name, tenant, None)
                # Re-encode only where vLLM must see a change: an image pio fetched is now
                # inline, or the client named a class in `priority` (vLLM takes integers).
                # The engine call takes pio's level from `current_request` whatever the body
                # says, and a body with megabytes of base64 costs milliseconds to encode on
                # the event loop.
                if await self._check_media(refs) or (
                        before is not None and type(before) is not int):
                    body = json.dumps(payload).encode()
                receive = _replay(body, receive)
                scope["headers"] = [
                    (k, v) for k, v in scope.get("headers") or []
                    if k.lower() not in (b"content-length", VLLM_PRIORITY_HEADER.encode())
                ] + [(b"content-length", str(len(body)).encode())]
        except PioError as e:
            if served is not None:
                self._release_unused(served)
            param = "priority" if isinstance(
                e, UnknownPriorityError | PriorityNotAllowedError) else None
            if served is not None:
                outcome.priority_class = served.class_name
            await _refuse(scope, receive, send, e, param)
            return
        outcome.priority_class = served.class_name
        token = current_request.set(served)
        if served.predicted_ttft_s is not None:
            send = _with_header(send, PREDICTED_TTFT_HEADER, f"{served.predicted_ttft_s:.4f}")
        try:
            await app(scope, receive, send)
        finally:
            current_request.reset(token)
            # vLLM refused the request before it reached the engine (a 400 of its own)
            self._release_unused(served)

    def _count(self, method: str, path: str, outcome: _Outcome) -> None:
        """The request's line in the debug log and its count per tenant (a configured
        tenant, `anonymous` without a key, `-` when authentication failed)."""
        logger.debug("%s %s tenant=%s class=%s status=%d", method, path, outcome.tenant,
                     outcome.priority_class, outcome.status)
        if self._requests is not None:
            self._requests.labels(tenant=outcome.tenant, priority_class=outcome.priority_class,
                                  status=str(outcome.status)).inc()

    def _pio_route(self, path: str) -> JSONResponse:
        """pio's own open routes: /get_load (vllm-router's power_of_two reads `load`) and
        /ready (503 while draining, when the engine is dead, or while every class's queue is
        full: this replica would shed everything)."""
        admission = self._engine.admission
        if path == "/get_load":
            if admission is not None:
                load = admission.load()
            else:
                load = self._engine.backend.num_unfinished() if not self._engine.closed else 0
            return JSONResponse({"load": load})
        reason = None
        if self._draining() or self._engine.closed:
            reason = "draining"
        elif self._engine.dead:
            reason = "engine dead"
        elif admission is not None and admission.saturated():
            reason = "every class queue is full"
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"ready": True})

    def _release_unused(self, served: ServedRequest) -> None:
        ticket = served.take_ticket()
        admission = self._engine.admission
        if ticket is not None and admission is not None:
            admission.release(ticket, Release.FAILED)

    # -- steps --------------------------------------------------------------------------

    def _authenticate(self, scope: Scope) -> tuple[str | None, str | None]:
        """(tenant, key's class); raises UnauthorizedError when keys are required."""
        if not self._keys:
            return None, None
        header = _header(scope, "authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthorizedError(
                "missing API key; send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for known, api_key in self._keys.items():
            if secrets.compare_digest(known, digest):
                found = api_key
        if found is None:
            raise UnauthorizedError("unknown API key")
        return found.tenant, found.priority_class

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self._server.max_body_bytes
        timeout_s = self._server.body_timeout_s
        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise InvalidRequestError("client disconnected while sending the body")
                    chunk = message.get("body", b"")
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLargeError(
                            f"request body is over server.max_body_bytes={limit} bytes; "
                            "accepted: a smaller body")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError as e:
            raise BodyTimeoutError(
                f"the request body did not arrive within server.body_timeout_s="
                f"{timeout_s}s ({total} bytes received)") from e

    def _parse(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body)
        except RecursionError as e:
            raise InvalidRequestError(
                f"request body is nested too deeply; accepted: JSON nested at most "
                f"{self._server.max_json_depth} levels") from e
        except ValueError as e:
            raise InvalidRequestError(
                f"request body is not valid JSON ({e.__class__.__name__} at "
                f"{getattr(e, 'pos', '?')}); accepted: a JSON object") from None
        if not isinstance(payload, dict):
            raise InvalidRequestError(
                f"request body is a JSON {type(payload).__name__}; accepted: a JSON object")
        depth = _depth(payload, self._server.max_json_depth)
        if depth > self._server.max_json_depth:
            raise InvalidRequestError(
                f"request body is nested more than {self._server.max_json_depth} levels; "
                f"accepted: at most server.max_json_depth={self._server.max_json_depth}")
        return payload

    async def _admit(self, scope: Scope, receive: Receive, payload: dict[str, Any],
                     refs: list[MediaRef], tenant: str | None,
                     key_class: str | None) -> ServedRequest | None:
        """Priority, deadline and sequences, then the wait in pio's queue (priced by its
        estimated tokens). None when the client disconnected while queued."""
        level, name = self._priority(scope, payload, key_class)
        payload["priority"] = level
        deadline_at = self._deadline(scope)
        slots = self._sequences(payload)
        served = ServedRequest(level, name, tenant, deadline_at)
        # per-request SLO headers (llm-d) are checked whether or not admission runs
        ttft_target_s = _slo_header(scope, SLO_TTFT_HEADER)
        tpot_target_s = _slo_header(scope, SLO_TPOT_HEADER)
        admission = self._engine.admission
        if admission is not None:
            prompt_tokens, vision_tokens = estimate_payload(
                payload, [r.value for r in refs], self._engine.backend.geometry,
                self._settings.admission.unknown_image_vision_tokens)
            ticket = admission.ticket(f"http-{next(self._ids)}", level, name, deadline_at,
                                      slots=slots, prompt_tokens=prompt_tokens,
                                      vision_tokens=vision_tokens,
                                      ttft_target_s=ttft_target_s, tpot_target_s=tpot_target_s)
            if not await _wait_unless_disconnected(admission.admit(ticket), receive):
                return None
            served.ticket = ticket
            served.predicted_ttft_s = ticket.predicted_ttft_s
        return served

    def _priority(self, scope: Scope, payload: dict[str, Any],
                  key_class: str | None) -> tuple[int, str]:
        raw: Any = self._objective_class(scope)
        for header in (() if raw is not None else (
                self._server.priority_header.lower(), VLLM_PRIORITY_HEADER)):
            value = _header(scope, header)
            if value is not None:
                raw = value.strip()
                if raw.lstrip("-").isdigit() and len(raw) <= 20:
                    raw = int(raw)
                break
        if raw is None:
            raw = payload.get("priority")
        if raw is None:
            raw = key_class
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        level, name = self._engine.resolve_priority(raw)
        ceiling = key_class or self._server.priority_ceiling or (
            self._settings.default_priority_class)
        ceiling_level = self._settings.priority_classes[ceiling].level
        if level < ceiling_level:
            whose = "this API key's class" if key_class else "server.priority_ceiling"
            raise PriorityNotAllowedError(
                f"priority {raw!r} (level {level}) is above {whose} {ceiling!r} (level "
                f"{ceiling_level}); accepted: levels >= {ceiling_level}")
        return level, name

    def _objective_class(self, scope: Scope) -> str | None:
        """The class an llm-d / GIE objective header names (server.objectives), if any."""
        for header in OBJECTIVE_HEADERS:
            value = _header(scope, header)
            if value is None:
                continue
            name = value.strip()
            cls = self._server.objectives.get(name)
            if cls is None:
                raise UnknownPriorityError(
                    f"{header}: objective {name[:60]!r} is not configured; accepted: "
                    f"{sorted(self._server.objectives) or 'none (server.objectives is empty)'}")
            return cls
        return None

    def _deadline(self, scope: Scope) -> float | None:
        header = _header(scope, self._server.timeout_header.lower())
        if header is None:
            return None
        try:
            seconds = float(header)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 86400 * 365:
            raise InvalidRequestError(
                f"{self._server.timeout_header}: {header[:40]!r} is invalid; accepted: a "
                "positive number of seconds")
        return time.monotonic() + seconds

    def _sequences(self, payload: dict[str, Any]) -> int:
        """Sequences the request runs in vLLM (its admission slots): n, or best_of."""
        limit = self._server.max_sequences_per_request
        counts = [1]
        for field in ("n", "best_of"):
            value = payload.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(
                    f"{field}={value!r:.40} is invalid; accepted: an integer from 1 to {limit}")
            if value > limit:
                raise InvalidRequestError(
                    f"{field}={value} is over server.max_sequences_per_request={limit}; "
                    f"accepted: 1 to {limit}")
            counts.append(value)
        return max(counts)

    def _media_refs(self, payload: dict[str, Any]) -> list[MediaRef]:
        """Every image reference in the body; refuses (at once, before any queueing) media
        pio does not accept and more images than allowed."""
        refs = scan(payload)
        if not refs:
            return refs
        for ref in refs:
            if ref.kind is MediaKind.REFUSED:
                raise ImageSourceError(
                    f"{ref.where}: {ref.detail} are not accepted; accepted: images as "
                    "http(s) or data: URLs (or Anthropic base64 / url sources)")
        limit = self._engine.backend.max_images_engine
        configured = self._settings.images.max_images_per_request
        limit = limit if configured is None else min(limit, configured)
        if len(refs) > limit:
            raise TooManyImagesError(
                f"request has {len(refs)} images; at most {limit} per request are accepted")
        return refs

    async def _check_media(self, refs: list[MediaRef]) -> bool:
        """Apply the media policy to every reference (fetch, read, check), rewriting the
        body in place; True if an image was fetched or read and is now inline."""
        rewritten = False
        for i, ref in enumerate(refs):
            rewritten = await self._check_image(ref, i) or rewritten
        return rewritten

    async def _check_image(self, ref: MediaRef, index: int) -> bool:
        """Check one image; True if it was fetched or read and is now inline."""
        if ref.kind is MediaKind.ANTHROPIC_BASE64:
            await self._images.probe_data_url(
                f"data:{ref.media_type or 'image/png'};base64,{ref.value}", index)
            return False
        url = ref.value
        if url.startswith("data:"):  # inline already: checked, passed on unchanged
            await self._images.probe_data_url(url, index)
            return False
        data = await self._images.source_bytes(url, index)
        _, _, fmt = await self._images.probe(data, index)
        ref.replace_url(
            f"data:image/{fmt or 'png'};base64,{base64.b64encode(data).decode()}")
        return True


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once past `limit` (iterative)."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


ANONYMOUS = "anonymous"  # the tenant label of requests without an API key


@dataclass
class _Outcome:
    """Who sent a gated request, at which class, and the status it got (for the count)."""

    tenant: str = "-"
    priority_class: str = "-"
    status: int = 0  # 0: no response started (the client left)


def _recording_status(send: Send, outcome: _Outcome) -> Send:
    async def wrapped(message: Any) -> None:
        if message.get("type") == "http.response.start":
            outcome.status = int(message.get("status", 0))
        await send(message)

    return wrapped


def _request_counter(registry: Any) -> Any:
    from prometheus_client import Counter

    return Counter("pio_requests", "Requests through pio's gate per tenant (API key), class "
                   "and HTTP status", ["tenant", "priority_class", "status"],
                   registry=registry)


async def _refuse(scope: Scope, receive: Receive, send: Send, error: PioError,
                  param: str | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": str(error)[:120]})
        return
    await error_response(error, param)(scope, receive, send)


async def _wait_unless_disconnected(admitted: Any, receive: Receive) -> bool:
    """Await `admitted` (the queue wait); False, with the wait cancelled, if the client
    disconnects first. The body has been read, so `receive` only reports a disconnect."""
    admit = asyncio.ensure_future(admitted)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({admit, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (admit, watch):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if admit.cancelled():
        return False
    admit.result()  # raises RequestRejectedError / DeadlineExceededError
    return True


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _header(scope: Scope, name: str) -> str | None:
    target = name.lower().encode()
    for key, value in scope.get("headers") or []:
        if key.lower() == target:
            return bytes(value).decode("latin-1")
    return None


def _with_header(send: Send, name: str, value: str) -> Send:
    """A `send` that adds one header to the response start."""

    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (name.encode(), value.encode())]}
        await send(message)

    return sender


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the (rewritten) body to the app once, then passes through
    (so the app still sees the client's disconnect and aborts the request)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _slo_header(scope: Scope, name: str) -> float | None:
    """A per-request SLO header in milliseconds, as seconds (None: absent)."""
    value = _header(scope, name)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0 < ms < 86_400_000:
        raise InvalidRequestError(f"{name}: {value[:40]!r} is invalid; accepted: a positive "
                                  "number of milliseconds")
    return ms / 1000.0
