"""Route policy of `pio-vllm serve`: deny by default (pure code, frontend process).

vLLM's app exposes many routes (read from vLLM 0.32.0: generation in several API dialects,
tokenizer, render, batch, SageMaker, scoring, elastic scaling, docs, ...), and a new vLLM
release may add more. pio serves an explicit list and turns every other route off:

- OPEN: no key needed, nothing reaches the engine: /health, /metrics, /version, and pio's
  own /get_load (the load vllm-router's power_of_two policy reads) and /ready;
- KEY_ONLY: an API key when keys are configured, no body: GET /v1/models;
- GATED: the whole gate (key, body limits, JSON, priority, deadline, pio's queue, the media
  policy): POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages;
- EXTRA: a route the operator turned back on (`server.extra_routes`): key, body limits,
  JSON and the media policy, but no queue (it does not generate);
- OFF: everything else, answered 404 by pio before vLLM sees the request.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class RoutePolicy(enum.Enum):
    OPEN = "open"
    KEY_ONLY = "key_only"
    GATED = "gated"
    EXTRA = "extra"
    OFF = "off"


# pio answers these itself (the gate), for routers and orchestrators.
PIO_PATHS = frozenset({"/get_load", "/ready"})
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"}) | PIO_PATHS
KEY_ONLY_ROUTES = frozenset({("GET", "/v1/models")})
GATED_ROUTES = frozenset({
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
})


def strip_root(path: str, root_path: str) -> str:
    """The app-relative path (`--root-path` moves every route under a prefix)."""
    root = root_path.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def classify(method: str, path: str, extra_routes: Iterable[str] = ()) -> RoutePolicy:
    """The policy of one request line (`path` relative to the root path)."""
    method = method.upper()
    if method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith("/metrics/")):
        return RoutePolicy.OPEN
    if (method if method != "HEAD" else "GET", path) in KEY_ONLY_ROUTES:
        return RoutePolicy.KEY_ONLY
    if (method, path) in GATED_ROUTES:
        return RoutePolicy.GATED
    if path in set(extra_routes):
        return RoutePolicy.EXTRA
    return RoutePolicy.OFF


def route_table(routes: Iterable[tuple[str, frozenset[str] | set[str] | None]],
                extra_routes: Iterable[str] = ()) -> dict[str, dict[str, RoutePolicy]]:
    """path -> method -> policy for an app's routes ((path, methods) pairs; a mount has no
    methods and is listed under GET)."""
    extra = list(extra_routes)
    table: dict[str, dict[str, RoutePolicy]] = {}
    for path, methods in routes:
        for method in sorted(methods or {"GET"}):
            table.setdefault(path, {})[method] = classify(method, path, extra)
    return table
