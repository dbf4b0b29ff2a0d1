"""PioEngineClient: vLLM's `EngineClient` with pio in the request path (frontend process).

vLLM's OpenAI server (`vllm.entrypoints.launchers`, read from vLLM 0.32.0) serves any
`EngineClient`: it renders chat prompts and images itself, calls `check_admission` before a
response starts, then iterates `generate(...)`. pio's RequestGate has already held the
request in pio's queue before any of that (its admission place travels in
`current_request`), so `generate` hands the rendered prompt to `PioEngine.generate_rendered`
(deadline, abort, metrics, vLLM priority); `check_admission` answers 503 while draining;
`shutdown` drains first. Every other EngineClient method is delegated to the AsyncLLM
unchanged, each named below (`tests/unit/test_serve_args.py` checks none is missing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from vllm.engine.protocol import EngineClient

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import EngineNotRunningError, PioError
from pio_vllm.server.http_errors import to_vllm_error
from pio_vllm.server.request_gate import current_request

logger = logging.getLogger(__name__)


def _delegate(name: str) -> Any:
    """A method that calls the AsyncLLM's method of the same name (sync or async: the
    caller awaits what AsyncLLM returns)."""

    def method(self: PioEngineClient, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._llm, name)(*args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"AsyncLLM.{name}, unchanged."
    return method


class PioEngineClient(EngineClient):
    """An EngineClient over a started PioEngine; build with the engine running."""

    def __init__(self, engine: PioEngine) -> None:
        self._pio = engine
        self._llm = engine.backend.llm
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def __getattr__(self, name: str) -> Any:
        # Attributes vLLM's serving layer reads (vllm_config, model_config, renderer,
        # input_processor, ...): the AsyncLLM's own.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._llm, name)

    @property
    def pio(self) -> PioEngine:
        return self._pio

    # -- state --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return bool(self._llm.is_running) and not self.draining

    @property
    def is_stopped(self) -> bool:
        return bool(self._llm.is_stopped)

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    @property
    def dead_error(self) -> BaseException:
        return self._llm.dead_error  # type: ignore[no-any-return]

    # -- requests -----------------------------------------------------------------------

    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        """Runs before a response starts: 503 while draining. Queueing and shedding were
        decided by the gate, before vLLM rendered anything."""
        if self.draining:
            raise to_vllm_error(EngineNotRunningError(
                "the server is shutting down; retry elsewhere"))

    async def generate(  # type: ignore[override]
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        priority: int = 0,
        **kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        served = current_request.get()
        try:
            if served is None:  # not through the gate (an internal caller)
                level, class_name = self._pio.resolve_priority(priority)
                deadline_at, ticket = None, None
            else:
                level, class_name = served.level, served.class_name
                deadline_at, ticket = served.deadline_at, served.take_ticket()
            kwargs.pop("prompt_text", None)  # AsyncLLM derives it from the rendered prompt
            vllm_kwargs = {k: v for k, v in kwargs.items() if v is not None}
            if ticket is not None:
                level = ticket.level  # admission may have moved it behind (served late)
            async for out in self._pio.generate_rendered(
                prompt, sampling_params, request_id, priority=level,
                priority_class=class_name, ticket=ticket, deadline_at=deadline_at,
                vllm_kwargs=vllm_kwargs,
            ):
                yield out
        except PioError as e:
            raise to_vllm_error(e) from e

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._pio.abort(ids)

    # -- shutdown -----------------------------------------------------------------------

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The server's event loop; `shutdown` (called from a worker thread) runs there."""
        self._loop = loop

    def shutdown(self, timeout: float | None = None) -> None:
        """Drain, then stop (vLLM's launcher calls this from a thread on SIGTERM).

        New requests get 503 at once; running and queued ones get
        `server.drain_timeout_s` to finish; the rest are aborted with a clear error; then
        the engine stops."""
        drain_s = self._pio.settings.server.drain_timeout_s
        if self._loop is None or self._loop.is_closed():
            self._llm.shutdown(timeout=timeout)
            return
        future = asyncio.run_coroutine_threadsafe(self.drain_and_stop(drain_s), self._loop)
        future.result()

    async def drain_and_stop(self, drain_s: float) -> None:
        self.draining = True
        started = time.monotonic()
        logger.info("draining: %d requests in flight, up to %.1fs",
                    self._pio.active_requests(), drain_s)
        try:
            await asyncio.wait_for(self._pio.wait_idle(), drain_s)
            logger.info("drained in %.2fs", time.monotonic() - started)
        except TimeoutError:
            left = self._pio.active_requests()
            logger.warning("drain timeout %.1fs: aborting %d requests", drain_s, left)
            await self._pio.abort_all("the server shut down before this request finished "
                                      f"(drain timeout {drain_s:.1f}s)")
            await asyncio.wait_for(self._pio.wait_idle(), 10.0)
        await self._pio.shutdown()

    # -- everything else: vLLM's AsyncLLM, unchanged -------------------------------------

    encode = _delegate("encode")
    check_health = _delegate("check_health")
    get_kv_event_sources = _delegate("get_kv_event_sources")
    notify_kv_transfer_request_rejected = _delegate("notify_kv_transfer_request_rejected")
    is_tracing_enabled = _delegate("is_tracing_enabled")
    do_log_stats = _delegate("do_log_stats")
    start_profile = _delegate("start_profile")
    stop_profile = _delegate("stop_profile")
    reset_mm_cache = _delegate("reset_mm_cache")
    reset_encoder_cache = _delegate("reset_encoder_cache")
    reset_prefix_cache = _delegate("reset_prefix_cache")
    sleep = _delegate("sleep")
    release_kv_cache_memory = _delegate("release_kv_cache_memory")
    wake_up = _delegate("wake_up")
    is_sleeping = _delegate("is_sleeping")
    add_lora = _delegate("add_lora")
    pause_generation = _delegate("pause_generation")
    resume_generation = _delegate("resume_generation")
    is_paused = _delegate("is_paused")
    scale_elastic_ep = _delegate("scale_elastic_ep")
    collective_rpc = _delegate("collective_rpc")
    compute_weight_checksums = _delegate("compute_weight_checksums")
    handle_fault = _delegate("handle_fault")
    get_status = _delegate("get_status")
    get_supported_tasks = _delegate("get_supported_tasks")
    init_weight_transfer_engine = _delegate("init_weight_transfer_engine")
    shutdown_weight_transfer_engine = _delegate("shutdown_weight_transfer_engine")
    start_weight_update = _delegate("start_weight_update")
    start_draft_weight_update = _delegate("start_draft_weight_update")
    update_weights = _delegate("update_weights")
    finish_weight_update = _delegate("finish_weight_update")
    update_weight_version = _delegate("update_weight_version")
    get_weight_version = _delegate("get_weight_version")
