"""`pio-vllm serve`: vLLM's OpenAI-compatible server with PioEngine as its engine client.

    pio-vllm serve --config configs/tiny-cpu.yaml [any `vllm serve` flag ...]

The pio config's `engine` section becomes the defaults of vLLM's own argument parser, so a
flag on the command line overrides the file; `--model` / the positional model tag may name
'pio:PRESET'. The app is vLLM's (`build_app`, `init_app_state`, `serve_http` from
`vllm.entrypoints.launchers`, read from vLLM 0.32.0), with pio's RequestGate middleware in
front of its routes, pio's metrics in the same Prometheus registry as vLLM's (/metrics), and
SIGTERM draining through `PioEngineClient.shutdown`. With `--api-server-count N` > 1, vLLM's
own multi-process frontend runs N such servers on one socket in front of one EngineCore,
admitting in one order through pio's node ledger (`api_servers.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from typing import Any

from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings, pio_log_level

logger = logging.getLogger(__name__)


def parse_args(argv: list[str], default_config: str | None) -> tuple[Any, PioSettings]:
    """(vLLM's serve Namespace, pio settings whose `engine` is the merged engine args)."""
    from vllm import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, rest = pre.parse_known_args(argv)
    settings = PioSettings.load(known.config)

    parser = make_arg_parser(FlexibleArgumentParser(
        prog="pio-vllm serve",
        description="vLLM's OpenAI-compatible server with pio's admission in the request "
        "path. --config FILE is pio's settings YAML; every other flag is vLLM's.",
    ))
    engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    vllm_defaults = {name: parser.get_default(name) for name in engine_fields}
    parser.set_defaults(**settings.engine)
    args = parser.parse_args(rest)
    if args.model_tag is not None:
        args.model = args.model_tag
    validate_parsed_serve_args(args)
    if getattr(args, "data_parallel_size", 1) > 1:
        raise ConfigError(
            f"--data-parallel-size {args.data_parallel_size}: pio admits into one engine "
            "(its capacity and KV usage are one engine's); accepted: 1. To grow, run replicas "
            "behind a router: pio-vllm serve-replicas --replicas N (tensor and pipeline "
            "parallelism pass through); to scale the frontend, --api-server-count N")
    if args.api_server_count is None:
        args.api_server_count = 1
    if not 1 <= args.api_server_count <= MAX_API_SERVERS:
        raise ConfigError(
            f"--api-server-count {args.api_server_count}: accepted 1..{MAX_API_SERVERS} "
            "(processes in front of one engine, admitting in one order)")
    # The engine arguments that differ from vLLM's defaults: the file's and the flags'.
    engine = {
        name: getattr(args, name) for name in engine_fields
        if hasattr(args, name) and getattr(args, name) != vllm_defaults[name]
    }
    engine["model"] = args.model
    settings = _media_policy(settings.model_copy(update={"engine": engine}), args)
    if args.served_model_name is None and str(args.model).startswith("pio:"):
        args.served_model_name = [args.model]  # clients ask for 'pio:tiny', not a cache path
    return args, settings


MAX_API_SERVERS = 64  # rows of the node ledger

# vLLM's media allow-list for pio's server: a reserved name no URL can match, so vLLM fetches
# nothing itself; the gate fetches (under pio's SSRF policy) and hands images inline.
VLLM_MEDIA_DOMAINS = ["pio-gate.invalid"]


def _media_policy(settings: PioSettings, args: Any) -> PioSettings:
    """Put media fetching under pio's policy: `--allowed-media-domains` becomes pio's
    allow-list, vLLM itself may fetch nothing, and vLLM's local-file access is refused."""
    if getattr(args, "allowed_local_media_path", None):
        raise ConfigError(
            f"--allowed-local-media-path {args.allowed_local_media_path!r} would let vLLM read "
            "local files past pio's gate; use images.allowed_local_dirs in the pio config")
    domains = settings.engine.get("allowed_media_domains")
    images = settings.images
    if domains and domains != VLLM_MEDIA_DOMAINS:
        if images.allowed_url_domains is not None and (
                sorted(images.allowed_url_domains) != sorted(domains)):
            raise ConfigError(
                f"--allowed-media-domains {domains} and images.allowed_url_domains "
                f"{images.allowed_url_domains} disagree; set one of them")
        images = images.model_copy(update={"allowed_url_domains": list(domains)})
    engine = {**settings.engine, "allowed_media_domains": VLLM_MEDIA_DOMAINS}
    args.allowed_media_domains = VLLM_MEDIA_DOMAINS
    return settings.model_copy(update={"engine": engine, "images": images})


def log_routes(app: Any, settings: PioSettings) -> dict[str, dict[str, Any]]:
    """Log each route of the app with its policy (open, key_only, gated, extra, off)."""
    from pio_vllm.server.route_policy import route_table

    routes = [(r.path, getattr(r, "methods", None)) for r in app.routes]
    table = route_table(routes, settings.server.extra_routes)
    for path, methods in sorted(table.items()):
        logger.info("route %s: %s", path,
                    ", ".join(f"{m} {p.value}" for m, p in sorted(methods.items())))
    return table


async def run_server(args: Any, settings: PioSettings, *, sock: Any = None,
                     listen_address: str | None = None, frontend: Any = None,
                     peer_loads: Any = None) -> None:
    """Start the engine, then serve until SIGTERM / SIGINT (drains first). With `frontend`
    (a FrontendSlot) and the parent's socket, serve as one of N API-server processes."""
    import prometheus_client
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    from vllm.usage.usage_lib import UsageContext

    from pio_vllm.engine.pio_engine import PioEngine
    from pio_vllm.engine.vllm_backend import resolve_model
    from pio_vllm.server.engine_client import PioEngineClient
    from pio_vllm.server.http_errors import install_error_handler
    from pio_vllm.server.request_gate import (
        APP_STATE_KEY,
        GATE_MIDDLEWARE,
        RequestGate,
        gate_image_loader,
    )

    if sock is None:
        listen_address, sock = setup_server(args, reuse_port=False)
    model_path = resolve_model(settings)
    args.model = model_path
    if args.tokenizer is None:
        args.tokenizer = model_path
    engine = PioEngine(settings, registry=prometheus_client.REGISTRY, vllm_renders=True,
                       frontend=frontend)
    engine.start_blocking(UsageContext.OPENAI_API_SERVER)
    client = PioEngineClient(engine)
    client.bind_loop(asyncio.get_running_loop())
    await client.reset_mm_cache()  # as vLLM's launcher: drop the profiling dummy data

    supported_tasks = await client.get_supported_tasks()
    # vLLM's --middleware seam; added last, so outermost: the gate sees every request
    # before vLLM's own middleware. Its configuration travels on the app's state.
    args.middleware = [*(args.middleware or []), GATE_MIDDLEWARE]
    app = build_app(args, supported_tasks, client.model_config)
    images = gate_image_loader(settings)
    setattr(app.state, APP_STATE_KEY, RequestGate(
        engine=engine, settings=settings, images=images, root_path=args.root_path or "",
        draining=lambda: client.draining, registry=prometheus_client.REGISTRY,
        api_server=None if frontend is None else frontend.index))
    install_error_handler(app)
    log_routes(app, settings)
    await init_app_state(client, app.state, args, supported_tasks)

    uvicorn_kwargs: dict[str, Any] = {}
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    logger.info("pio-vllm serving %s on %s%s", settings.model, listen_address,
                "" if frontend is None else
                f" (API server {frontend.index} of {frontend.count})")
    if peer_loads is not None:  # vLLM's accept-on-the-least-loaded-server (N > 1)
        uvicorn_kwargs["peer_loads"] = peer_loads
    # The same keywords as vLLM 0.32.0's build_and_serve.
    shutdown_task = await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )
    try:
        await shutdown_task
    finally:
        sock.close()
        await images.aclose()
        if not engine.closed:
            await engine.shutdown()


def setup_logging() -> None:
    """pio's own handler: vLLM and uvicorn reconfigure logging while the server starts, and
    the drain / shutdown lines must still reach the operator."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pio_logger = logging.getLogger("pio_vllm")
    pio_logger.addHandler(handler)
    pio_logger.setLevel(pio_log_level(default="INFO"))
    pio_logger.propagate = False


def main(argv: list[str], default_config: str | None) -> int:
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    setup_logging()
    args, settings = parse_args(argv, default_config)
    if args.api_server_count > 1:
        from pio_vllm.server.api_servers import serve_api_servers

        serve_api_servers(args, settings)
        return 0
    uvloop.run(run_server(args, settings))
    return 0
