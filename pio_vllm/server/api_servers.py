"""`pio-vllm serve --api-server-count N`: N API-server processes in front of one EngineCore.

vLLM's multimodal rendering runs on one thread per API-server process, and vLLM scales it
with `--api-server-count N` (vllm/entrypoints/cli/serve.py `run_multi_api_server`, read
from vLLM 0.32.0). This is that function with pio's server in each process: the parent
binds the socket (SO_REUSEPORT) and vLLM's ZMQ listeners, starts the EngineCore (with pio's
scheduler installed, as a single server would), creates pio's node ledger, and starts N
processes through vLLM's `APIServerProcessManager`, whose `target_server_fn` seam runs
`api_server_proc` in each. Every process renders its own requests and admits through the
ledger (admission/node_ledger.py): one capacity, one work bucket, one queue order for the
node. vLLM's supervision is kept: if any process exits, all are stopped.

Metrics: vLLM's multi-process Prometheus mode (`PROMETHEUS_MULTIPROC_DIR`); pio's queue
gauges sum over live processes, its counters add up, `/metrics` from any process shows the
node. `/get_load` and `vllm:num_requests_waiting` read the node ledger, so they are the
node's too.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from pio_vllm.admission import node_ledger
from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings

logger = logging.getLogger(__name__)


def serve_api_servers(args: Any, settings: PioSettings) -> None:
    """Run the EngineCore and `args.api_server_count` pio API servers until SIGTERM /
    SIGINT (each server drains first) or until one of them exits."""
    try:
        from vllm.entrypoints.launchers.launcher import setup_server
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
        from vllm.v1.executor import Executor
        from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
        from vllm.v1.utils import APIServerProcessManager, wait_for_completion_or_failure
    except ImportError as e:
        raise ConfigError(
            f"--api-server-count {args.api_server_count} needs vLLM 0.32's multi-process "
            f"frontend ({e}); accepted on this vLLM: 1") from e

    from pio_vllm.engine.vllm_backend import engine_config

    count = int(args.api_server_count)
    setup_multiprocess_prometheus()
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise SystemExit

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # the EngineCore and the servers inherit vLLM's environment set here
    _, vllm_config, model_path, scheduler = engine_config(
        settings, UsageContext.OPENAI_API_SERVER, api_processes=(count, -1))
    args.model = model_path
    if args.tokenizer is None:
        args.tokenizer = model_path
    listen_address, sock = setup_server(args, reuse_port=True)
    if scheduler is not None:
        logger.info("vLLM runs pio's scheduler %s", scheduler)

    ledger_dir = tempfile.TemporaryDirectory(prefix="pio-node-", dir=node_ledger.default_dir())
    ledger = node_ledger.create(Path(ledger_dir.name) / "ledger", count)
    args._pio_settings = settings
    args._pio_ledger = str(ledger)
    logger.info("starting %d API servers on %s (node ledger %s)", count, listen_address, ledger)

    listeners = bind_engine_zmq_listeners(vllm_config, count)
    manager = None
    engine_manager = coordinator = None
    try:
        # log_stats on: pio's admission reads every step's stats, as AsyncLLM turns them on
        # for the stat loggers pio passes in one process
        with launch_core_engines(vllm_config, Executor.get_class(vllm_config), True,
                                 listeners.addresses) as launch:
            engine_manager, coordinator = launch.engine_manager, launch.coordinator
            stats_address = (coordinator.get_stats_publish_address()
                             if coordinator else None)
            manager = APIServerProcessManager(
                listen_address=listen_address, sock=sock, args=args, num_servers=count,
                input_listeners=listeners.inputs, output_listeners=listeners.outputs,
                target_server_fn=api_server_proc, stats_update_address=stats_address,
                tensor_queue=launch.tensor_queue)
            launch.watched_frontend_processes = manager.processes
        wait_for_completion_or_failure(api_server_manager=manager,
                                       engine_manager=engine_manager,
                                       coordinator=coordinator)
    finally:
        # each server drains for server.drain_timeout_s after its SIGTERM
        timeout = max(float(vllm_config.shutdown_timeout or 0),
                      settings.server.drain_timeout_s + 15.0)
        shutdown_by = time.monotonic() + timeout
        if manager is not None:
            manager.shutdown(timeout=timeout)
        left = max(0.0, shutdown_by - time.monotonic())
        if engine_manager is not None:
            engine_manager.shutdown(timeout=left)
        if coordinator is not None:
            coordinator.shutdown(timeout=left)
        sock.close()
        ledger_dir.cleanup()


def api_server_proc(listen_address: str, sock: Any, args: Any,
                    client_config: dict[str, Any] | None = None) -> None:
    """One API-server process (vLLM's `APIServerProcessManager` spawns it): pio's server on
    the shared socket, connected to the parent's EngineCore."""
    import uvloop
    from vllm.utils.system_utils import decorate_logs, set_process_title

    from pio_vllm.engine.vllm_backend import FrontendSlot
    from pio_vllm.server.launcher import run_server, setup_logging

    config = dict(client_config or {})
    index = int(config.get("client_index", 0))
    set_process_title("APIServer", str(index))
    decorate_logs()
    setup_logging()
    peer_loads = None
    if "api_server_loads" in config:  # vLLM accepts each connection on the least loaded
        peer_loads = (config.pop("api_server_loads"), index)
    slot = FrontendSlot(index=index, count=int(args.api_server_count), client_config=config,
                        ledger_path=args._pio_ledger)
    uvloop.run(run_server(args, args._pio_settings, sock=sock, listen_address=listen_address,
                          frontend=slot, peer_loads=peer_loads))
