"""RequestGate: pio's ASGI middleware in front of vLLM's OpenAI routes (frontend process).

For every /v1 request, before vLLM parses it:

1. API key (when `server.api_keys` is set): a missing or unknown key is a 401 and the request
   never reaches the engine.
2. Priority: the `X-Priority` header (class name or level), else the body's `priority`
   (level or class name), else the API key's class, else the default class. An unknown class
   is a 400. The body's `priority` is rewritten to the level so vLLM's own field agrees.
3. Deadline: the `X-Request-Timeout-S` header (seconds) bounds queueing and generation (504).
4. Admission: the request waits in pio's queue, in priority order, holding only its bounded
   body (429 with Retry-After when shed, 504 when its deadline passes there; a client that
   disconnects leaves the queue). Nothing below runs for it before it leaves the queue: an
   urgent request never waits behind a flood's image fetching, chat templating or image
   processing, which vLLM's serving layer does for each request in arrival order.
5. Images (chat `image_url` parts): data URLs are size- and header-checked; http(s) URLs are
   fetched under pio's domain allow-list, byte and time limits; file URLs are refused unless
   under `images.allowed_local_dirs`. Fetched and local images are handed to vLLM as data
   URLs, so vLLM itself never touches the network or the disk for a request. Pixel counts
   come from the header only: decompression bombs are refused before any decode.

What the gate decided travels to `PioEngineClient` in a context variable (`current_request`);
an admission place that no engine call took over is released when the response ends.
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

from pio_vllm.admission.controller import Release, Ticket
from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import (
    EngineNotRunningError,
    ImageError,
    InvalidRequestError,
    PioError,
    PriorityNotAllowedError,
    TooManyImagesError,
    UnauthorizedError,
    UnknownPriorityError,
)
from pio_vllm.intake.image_loader import ImageLoader
from pio_vllm.server.http_errors import error_response
from pio_vllm.settings import ImageSettings, PioSettings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes whose body the gate reads (the others under /v1 get the key check only).
GENERATE_PATHS = ("/v1/chat/completions", "/v1/completions")
GUARDED_PREFIX = "/v1"


@dataclass
class ServedRequest:
    """What the gate decided for one HTTP request; read by PioEngineClient."""

    level: int
    class_name: str
    tenant: str | None
    deadline_at: float | None  # monotonic
    ticket: Ticket | None = None  # admission place left to use, until an engine call takes it

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
            if scope["type"] == "http":
                await error_response(EngineNotRunningError(
                    "pio's request gate is not configured; the server refuses requests"))(
                    scope, receive, send)
            return
        await gate.serve(scope, receive, send, self.app)


# Where the launcher puts the RequestGate: `app.state.pio_request_gate`.
APP_STATE_KEY = "pio_request_gate"
GATE_MIDDLEWARE = f"{__name__}.GateMiddleware"


class RequestGate:
    """pio's checks and queue in front of vLLM's routes, for one server. While
    `draining()` is true (SIGTERM), new /v1 requests get 503."""

    def __init__(self, *, engine: PioEngine, settings: PioSettings, images: ImageLoader,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self._draining = draining
        self._engine = engine
        self._settings = settings
        self._server = settings.server
        self._keys = {
            hashlib.sha256(k.key.get_secret_value().encode()).digest(): k
            for k in settings.server.api_keys or []
        }
        self._images = images
        self._ids = itertools.count()

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: Any) -> None:
        """Check `scope`'s request and pass it to `app` (vLLM's routes) when admitted."""
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(GUARDED_PREFIX) or (
                scope.get("method") == "OPTIONS"):
            await app(scope, receive, send)
            return
        served: ServedRequest | None = None
        try:
            tenant, key_class = self._authenticate(scope)
            if self._draining():
                raise EngineNotRunningError("the server is shutting down; retry elsewhere")
            if scope.get("method") == "POST" and path in GENERATE_PATHS:
                body = await _read_body(receive, self._server.max_body_bytes)
                served, body = await self._admit(scope, receive, body, tenant, key_class)
                if served is None:  # the client left while queued
                    return
                receive = _replay(body, receive)
                scope["headers"] = [
                    (k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"
                ] + [(b"content-length", str(len(body)).encode())]
            else:
                level, name = self._engine.resolve_priority(key_class)
                served = ServedRequest(level, name, tenant, None)
        except PioError as e:
            param = "priority" if isinstance(
                e, UnknownPriorityError | PriorityNotAllowedError) else None
            await error_response(e, param)(scope, receive, send)
            return
        token = current_request.set(served)
        try:
            await app(scope, receive, send)
        finally:
            current_request.reset(token)
            ticket = served.take_ticket()
            admission = self._engine.admission
            if ticket is not None and admission is not None:
                # vLLM refused the request before it reached the engine (a 400 of its own)
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

    async def _admit(
        self, scope: Scope, receive: Receive, body: bytes, tenant: str | None,
        key_class: str | None,
    ) -> tuple[ServedRequest | None, bytes]:
        """Wait in pio's queue, then check and fetch images. (None, body) when the client
        disconnected while queued."""
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            # Not a JSON object: vLLM answers with its own 400; no admission is needed.
            level, name = self._engine.resolve_priority(key_class)
            return ServedRequest(level, name, tenant, None), body
        level, name = self._priority(scope, payload, key_class)
        # vLLM reads the body's `priority` as a level; rewrite the body only when it must
        # change (a class name there, or fetched images below): re-encoding a body with
        # megabytes of base64 costs milliseconds on the event loop.
        rewrite = isinstance(payload.get("priority"), str)
        payload["priority"] = level
        deadline_at = self._deadline(scope)
        served = ServedRequest(level, name, tenant, deadline_at)
        admission = self._engine.admission
        if admission is not None:
            ticket = admission.ticket(f"http-{next(self._ids)}", level, name, deadline_at,
                                      slots=_sequences(payload))
            if not await _wait_unless_disconnected(admission.admit(ticket), receive):
                return None, body
            served.ticket = ticket
        try:
            rewrite = await self._check_images(payload) or rewrite
        except BaseException:
            unused = served.take_ticket()
            if unused is not None and admission is not None:
                admission.release(unused, Release.FAILED)
            raise
        return served, json.dumps(payload).encode() if rewrite else body

    def _priority(
        self, scope: Scope, payload: dict[str, Any], key_class: str | None
    ) -> tuple[int, str]:
        header = _header(scope, self._server.priority_header.lower())
        raw: Any
        if header is not None:
            raw = header.strip()
            if raw.lstrip("-").isdigit():
                raw = int(raw)
        elif payload.get("priority") is not None:
            raw = payload["priority"]
        else:
            raw = key_class
        level, name = self._engine.resolve_priority(raw)
        if key_class is not None:
            key_level = self._settings.priority_classes[key_class].level
            if level < key_level:
                raise PriorityNotAllowedError(
                    f"priority {raw!r} (level {level}) is above this API key's class "
                    f"{key_class!r} (level {key_level}); accepted: levels >= {key_level}"
                )
        return level, name

    def _deadline(self, scope: Scope) -> float | None:
        header = _header(scope, self._server.timeout_header.lower())
        if header is None:
            return None
        try:
            seconds = float(header)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise InvalidRequestError(
                f"{self._server.timeout_header}: {header!r} is invalid; accepted: a positive "
                "number of seconds"
            )
        return time.monotonic() + seconds

    async def _check_images(self, payload: dict[str, Any]) -> bool:
        """Check every image part; True if one was rewritten (fetched into a data URL)."""
        parts = [
            part
            for message in payload.get("messages") or []
            if isinstance(message, dict) and isinstance(message.get("content"), list)
            for part in message["content"]
            if isinstance(part, dict) and part.get("type") == "image_url"
        ]
        if not parts:
            return False
        limit = self._settings.images.max_images_per_request
        engine_limit = self._engine.backend.max_images_engine
        limit = engine_limit if limit is None else min(limit, engine_limit)
        if len(parts) > limit:
            raise TooManyImagesError(
                f"request has {len(parts)} images; at most {limit} per request are accepted")
        rewritten_any = False
        for i, part in enumerate(parts):
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise ImageError(
                    f"image_url {image_url!r} has no url; accepted: "
                    '{"url": "data:image/...;base64,..." | "https://..."}', i)
            data = await self._images.source_bytes(url, i)
            _, _, fmt = await self._images.probe(data, i)
            if not url.startswith("data:"):
                rewritten = f"data:image/{fmt or 'png'};base64,{base64.b64encode(data).decode()}"
                if isinstance(image_url, dict):
                    image_url["url"] = rewritten
                else:
                    part["image_url"] = {"url": rewritten}
                rewritten_any = True
        return rewritten_any


def _sequences(payload: dict[str, Any]) -> int:
    """Sequences a request runs in vLLM (its admission slots): n, or best_of if larger."""
    counts = [payload.get("n"), payload.get("best_of")]
    return max([1, *(c for c in counts if isinstance(c, int) and not isinstance(c, bool))])


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


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequestError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > max_bytes:
            raise InvalidRequestError(
                f"request body exceeds server.max_body_bytes={max_bytes}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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
