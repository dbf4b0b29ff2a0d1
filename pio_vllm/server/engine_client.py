"""PioEngineClient: vLLM's `EngineClient` with pio in the request path (frontend process).

vLLM's OpenAI server (`vllm.entrypoints.launchers`, read from vLLM 0.32.0) serves any
`EngineClient`: it renders chat prompts and images itself, calls `check_admission` before a
response starts, then iterates `generate(...)`. This client composes the AsyncLLM that
PioEngine owns: `generate` goes through pio's admission (priority, shedding, deadlines,
preemption with resume), `check_admission` answers 429/503 up front, `abort` finds a request
under whatever vLLM id its current attempt has, `shutdown` drains first. Everything else
(`vllm_config`, `renderer`, `get_supported_tasks`, sleep, LoRA, profiling ...) is delegated
to the AsyncLLM unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from vllm.engine.protocol import EngineClient

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import EngineNotRunningError, PioError
from pio_vllm.server.http_errors import to_vllm_error
from pio_vllm.server.request_gate import ServedRequest, current_request

logger = logging.getLogger(__name__)


class PioEngineClient(EngineClient):
    """An EngineClient over a started PioEngine; build with the engine running."""

    def __init__(self, engine: PioEngine) -> None:
        self._pio = engine
        self._llm = engine.backend.llm
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class does not define: vLLM's own.
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
        """Refuse before the response starts: 503 while draining, 429 when shed.

        The gate normally reserved the place already; a route the gate does not read
        (e.g. /v1/responses) reserves it here, in its class, with its deadline."""
        if self.draining:
            raise to_vllm_error(EngineNotRunningError(
                "the server is shutting down; retry elsewhere"))
        served = current_request.get()
        admission = self._pio.admission
        if served is None or served.ticket is not None or admission is None:
            return
        ticket = admission.ticket(request_id or "http", served.level, served.class_name,
                                  served.deadline_at)
        try:
            admission.reserve(ticket)
        except PioError as e:
            raise to_vllm_error(e) from e
        served.ticket = ticket

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
        if served is None:  # not through the gate (e.g. an internal caller)
            level, name = self._pio.resolve_priority(priority)
            served = ServedRequest(level, name, None, None)
        kwargs.pop("prompt_text", None)  # AsyncLLM derives it from the rendered prompt
        vllm_kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            async for out in self._pio.generate_rendered(
                prompt, sampling_params, request_id,
                priority=served.level, priority_class=served.class_name,
                ticket=served.take_ticket(), deadline_at=served.deadline_at,
                vllm_kwargs=vllm_kwargs,
            ):
                yield out
        except PioError as e:
            raise to_vllm_error(e) from e

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self._llm.encode(*args, **kwargs)

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._pio.abort(ids)

    async def check_health(self) -> None:
        await self._llm.check_health()

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
        active = self._pio.active_requests()
        logger.info("draining: %d requests in flight, up to %.1fs", active, drain_s)
        while self._pio.active_requests() and time.monotonic() - started < drain_s:
            await asyncio.sleep(0.05)
        left = self._pio.active_requests()
        if left:
            logger.warning("drain timeout %.1fs: aborting %d requests", drain_s, left)
            await self._pio.abort_all("the server shut down before this request finished "
                                      f"(drain timeout {drain_s:.1f}s)")
        else:
            logger.info("drained in %.2fs", time.monotonic() - started)
        await self._pio.shutdown()


def _delegate(name: str, is_async: bool) -> Any:
    if is_async:
        async def method(self: PioEngineClient, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self._llm, name)(*args, **kwargs)
    else:
        def method(self: PioEngineClient, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            return getattr(self._llm, name)(*args, **kwargs)

    method.__name__ = name
    return method


# Every other EngineClient method (sleep, LoRA, profiling, caches, pause, supported tasks,
# weight updates ...) goes to the AsyncLLM as it is: the base class defines them (abstract
# or raising NotImplementedError), so __getattr__ alone would not reach AsyncLLM's.
for _name, _attr in list(vars(EngineClient).items()):
    if _name.startswith("_") or _name in PioEngineClient.__dict__ or not inspect.isfunction(
            _attr):
        continue
    setattr(PioEngineClient, _name, _delegate(_name, inspect.iscoroutinefunction(_attr)))
PioEngineClient.__abstractmethods__ = frozenset()
