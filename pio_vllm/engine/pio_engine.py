"""PioEngine: pio's async engine over vLLM's AsyncLLM (frontend process, asyncio).

    async with PioEngine.from_settings(settings) as engine:
        async for out in engine.generate(PioRequest(prompt="Describe", images=[img])):
            print(out.text_delta, end="")

A request's path, one module per stage: priority and sampling checks (here) -> pio's queue
(`admission/controller.py`: nothing is rendered or decoded while a request waits) -> intake
(`intake/request_intake.py`: chat template, images, token count) -> vLLM
(`request_runner.py`: submit with the priority, deadline, abort) -> outputs (here: text
deltas, RequestResult, completion callback). The OpenAI server enters at the same runner
with a prompt vLLM's serving layer rendered (`generate_rendered`). Preemption of
lower-priority work happens inside vLLM's scheduler (patches/priority_preemption.py). The
EngineCore and its worker run in child processes that vLLM spawns; this object lives in the
caller's event loop.

Size: this is the public API (generate, generate_rendered for the server, generate_batch,
complete, stats, lifecycle) and the wiring of its parts; the stages themselves are the
modules named above (~590 lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pio_vllm.admission.controller import AdmissionController, AdmissionStats, Ticket
from pio_vllm.admission.node_ledger import NodeLedger
from pio_vllm.cost.request_cost import CostModel, RequestCost
from pio_vllm.engine.batch_tuning import TuningLoop
from pio_vllm.engine.request_runner import RequestRunner, Submission
from pio_vllm.engine.request_trace import RequestTrace
from pio_vllm.engine.stats_probe import EngineStats
from pio_vllm.engine.vllm_backend import FrontendSlot, VllmBackend
from pio_vllm.errors import (
    EngineDeadError,
    EngineNotRunningError,
    InvalidRequestError,
    PioError,
    UnknownPriorityError,
)
from pio_vllm.intake.cost_estimate import estimate_request
from pio_vllm.intake.image_loader import ImageCacheStats, ImageLoader
from pio_vllm.intake.request_intake import RequestIntake, max_images_per_request
from pio_vllm.request import (
    PioOutput,
    PioRequest,
    RequestOutcome,
    RequestResult,
    RequestTimings,
)
from pio_vllm.settings import PioSettings
from pio_vllm.tuning.batch_tuner import RequestMix, TunerStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSnapshot:
    """What `PioEngine.stats()` reports."""

    active_requests: int
    completed: int
    failed: int
    cancelled: int
    vllm_unfinished: int
    engine: EngineStats
    image_cache: ImageCacheStats
    engine_start_s: float
    admission: AdmissionStats | None
    tuning: TunerStats | None
    preemptions_total: int  # pio's preemptions inside vLLM seen by finished requests


@dataclass
class _Running:
    """The engine parts that exist while vLLM runs."""

    backend: VllmBackend
    images: ImageLoader
    intake: RequestIntake
    runner: RequestRunner
    costs: CostModel


class PioEngine:
    """Priority-aware async engine for Qwen3-VL over vLLM. Use as an async context manager."""

    def __init__(
        self,
        settings: PioSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        registry: Any | None = None,
        vllm_renders: bool = False,
        frontend: FrontendSlot | None = None,
    ) -> None:
        """`registry`: a prometheus_client registry for pio's metrics (None: a private one).
        `vllm_renders`: requests reach pio already rendered by vLLM's serving layer (the
        OpenAI server): the top class then skips `admission.max_preparing` (see
        AdmissionController). `frontend`: this process is one of several API servers of one
        engine (`pio-vllm serve --api-server-count N`): it connects to the parent's
        EngineCore, admits through the node ledger shared with the others
        (admission/node_ledger.py), and only API server 0 runs the tuning loop (the step
        model and limits it fits reach the others through the ledger)."""
        from prometheus_client import CollectorRegistry

        self._settings = settings
        self._clock = clock
        self._registry = registry if registry is not None else CollectorRegistry()
        self._vllm_renders = vllm_renders
        self._frontend = frontend
        self._node: NodeLedger | None = None
        self._parts: _Running | None = None
        self._admission: AdmissionController | None = None
        self._tuning: TuningLoop | None = None
        self._active: dict[str, tuple[RequestTrace, RequestCost | None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._counts = {o: 0 for o in RequestOutcome}
        self._preemptions = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: PioSettings | None = None, **overrides: Any) -> PioEngine:
        """An engine for `settings` (default: `PioSettings.load(**overrides)`); not started."""
        if settings is None:
            settings = PioSettings.load(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        return cls(settings)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> PioEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start vLLM (blocks the loop while the engine processes start, ~30-60 s on CPU)."""
        self.start_blocking()

    def start_blocking(self, usage_context: Any | None = None) -> None:
        """Start vLLM from synchronous code; vLLM's output loop starts on the first request.

        `usage_context`: vLLM's UsageContext (the server passes OPENAI_API_SERVER)."""
        if self._parts is not None:
            return
        if self._closed:
            raise EngineNotRunningError("this PioEngine was shut down; create a new one")
        backend = VllmBackend.start(self._settings, usage_context, self._frontend)
        admission = self._settings.admission
        frontend = self._frontend
        if admission.enabled:
            capacity = admission.max_in_flight or backend.max_num_seqs + admission.lookahead
            if frontend is not None and frontend.count > 1:
                self._node = NodeLedger(Path(frontend.ledger_path), frontend.index,
                                        list(self._settings.priority_classes))
            self._admission = AdmissionController(
                admission, self._settings.priority_classes,
                self._settings.default_priority_class, capacity,
                clock=self._clock, registry=self._registry,
                bound_top_class=not self._vllm_renders, node=self._node,
            )
            controller = self._admission
            backend.probe.add_listener(
                lambda st: controller.update_engine(st.kv_cache_usage, st.num_running,
                                                    st.inter_token_s_total,
                                                    st.inter_tokens_total))
            # vllm:num_requests_waiting counts what pio holds before vLLM too (its queue
            # and its rendering), refreshed whenever that changes, not only per engine step
            backend.probe.add_waiting(
                lambda: controller.queued_count() + controller.preparing_count())
            controller.metrics.on_held_change(backend.probe.refresh_waiting)
        images = ImageLoader(self._settings.images)
        intake = RequestIntake(
            images, tokenizer=backend.tokenizer, geometry=backend.geometry,
            max_model_len=backend.max_model_len,
            max_images=max_images_per_request(self._settings.images,
                                              backend.max_images_engine))
        runner = RequestRunner(backend, self._admission, self._clock, self._spawn)
        self._parts = _Running(backend, images, intake, runner,
                               CostModel(backend.geometry, backend.block_size))
        tuner_here = frontend is None or frontend.index == 0
        if tuner_here and (self._settings.tuning.enabled or self._settings.slo_admission_on()):
            self._tuning = TuningLoop(
                self._settings.tuning, backend, self._admission, self._request_mix,
                admission.kv_high_watermark, admission.lookahead, self._registry,
                apply_limits=self._settings.tuning.enabled)
        levels = {c.level for c in self._settings.priority_classes.values()}
        if backend.scheduling_policy != "priority" and len(levels) > 1:
            logger.warning(
                "vLLM scheduling_policy is %r: vLLM ignores request priorities; set "
                "engine.scheduling_policy: priority to order its waiting queue",
                backend.scheduling_policy,
            )

    async def shutdown(self) -> None:
        """Fail what is queued, abort what runs, wait for callbacks, stop vLLM's processes."""
        if self._closed:
            return
        self._closed = True
        if self._admission is not None:
            self._admission.close()
        if self._tuning is not None:
            await self._tuning.aclose()
        parts, self._parts = self._parts, None
        if parts is not None:
            for trace, _ in list(self._active.values()):
                if trace.submitted_at is not None:
                    with contextlib.suppress(Exception):
                        await parts.backend.abort(trace.request_id)
        if self._background:
            await asyncio.wait(list(self._background), timeout=self._settings.shutdown_timeout_s)
        if parts is not None:
            await parts.images.aclose()
            parts.backend.shutdown()
        if self._node is not None:
            self._node.close()

    def _running(self) -> _Running:
        if self._parts is None:
            raise EngineNotRunningError(
                "PioEngine is not running; use `async with PioEngine.from_settings(...)`")
        if self._parts.backend.errored:
            raise EngineDeadError("the vLLM engine has died; restart the engine")
        return self._parts

    @property
    def backend(self) -> VllmBackend:
        """The vLLM adapter (raises EngineNotRunningError before start / after shutdown)."""
        return self._running().backend

    @property
    def settings(self) -> PioSettings:
        return self._settings

    @property
    def closed(self) -> bool:
        """True once shutdown() has begun."""
        return self._closed

    @property
    def dead(self) -> bool:
        """True when vLLM's engine has died."""
        return self._parts is not None and self._parts.backend.errored

    @property
    def tuning(self) -> TuningLoop | None:
        """The batch-tuning loop (None unless tuning.enabled)."""
        return self._tuning

    @property
    def admission(self) -> AdmissionController | None:
        """The admission controller (None when admission is disabled)."""
        return self._admission

    def stats(self) -> EngineSnapshot:
        parts = self._running()
        return EngineSnapshot(
            active_requests=len(self._active),
            completed=self._counts[RequestOutcome.FINISHED],
            failed=self._counts[RequestOutcome.FAILED],
            cancelled=self._counts[RequestOutcome.CANCELLED],
            vllm_unfinished=parts.backend.num_unfinished(),
            engine=parts.backend.probe.snapshot(),
            image_cache=parts.images.stats(),
            engine_start_s=parts.backend.start_s,
            admission=self._admission.stats() if self._admission is not None else None,
            tuning=self._tuning.stats() if self._tuning is not None else None,
            preemptions_total=self._preemptions,
        )

    def active_requests(self) -> int:
        """Requests pio holds (queued, being prepared, or in vLLM)."""
        return len(self._active)

    async def wait_idle(self) -> None:
        """Return once pio holds no request, queued ones included (the server's drain
        waits on this)."""
        while True:
            await self._idle.wait()
            if self._admission is not None:
                await self._admission.wait_idle()
            if self._idle.is_set():
                return

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests in vLLM by id (the OpenAI server calls this on a disconnect)."""
        backend = self.backend
        for rid in request_ids:
            await backend.abort(rid)

    async def abort_all(self, reason: str) -> None:
        """Fail every request pio holds with EngineNotRunningError(`reason`): queued ones
        leave the queue, running ones are aborted in vLLM. New requests are refused."""
        if self._admission is not None:
            self._admission.close()
        runner = self._running().runner
        for trace, _ in list(self._active.values()):
            runner.abort(trace, EngineNotRunningError(f"request {trace.request_id}: {reason}"))

    # -- priorities ---------------------------------------------------------------------

    def resolve_priority(self, priority: str | int | None) -> tuple[int, str]:
        """(vLLM level, class name) for a request's priority; lower level is served first.

        A class name, or an integer level within the configured classes' range: a level
        between two classes runs in the lower-priority one (never above what was asked).
        """
        classes = self._settings.priority_classes
        if priority is None:
            name = self._settings.default_priority_class
            return classes[name].level, name
        if isinstance(priority, str):
            if priority not in classes:
                raise UnknownPriorityError(
                    f"unknown priority class {priority!r}; accepted: {self.class_list()} "
                    "or an integer level")
            return classes[priority].level, priority
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise UnknownPriorityError(
                f"priority {priority!r} is neither a class name nor an integer level; "
                f"accepted: {self.class_list()}")
        at_or_below = [(c.level, n) for n, c in classes.items() if c.level >= priority]
        top = max(c.level for c in classes.values())
        if priority < min(c.level for c in classes.values()) or priority > top:
            raise UnknownPriorityError(
                f"priority level {priority} is outside the configured classes; accepted: "
                f"{self.class_list()}")
        level, name = min(at_or_below)
        return level, name

    def class_list(self) -> str:
        """The configured classes, highest priority first, for error messages."""
        items = sorted(self._settings.priority_classes.items(), key=lambda kv: kv[1].level)
        return ", ".join(f"{n} (level {c.level})" for n, c in items)

    # -- requests -----------------------------------------------------------------------

    def _deadline_at(self, request: PioRequest) -> float | None:
        now_mono, now_wall = self._clock(), time.time()
        candidates = []
        if request.deadline is not None:
            candidates.append(now_mono + (request.deadline - now_wall))
        if request.timeout_s is not None:
            if request.timeout_s <= 0:
                raise InvalidRequestError(
                    f"timeout_s={request.timeout_s} is invalid; accepted: a positive number")
            candidates.append(now_mono + request.timeout_s)
        return min(candidates) if candidates else None

    def _begin(self, request_id: str, level: int, class_name: str, deadline_at: float | None,
               metadata: Any = None) -> RequestTrace:
        if request_id in self._active:
            raise InvalidRequestError(
                f"request_id {request_id!r} is already in flight; ids must be unique")
        trace = RequestTrace(request_id, arrival_wall=time.time(), arrival_at=self._clock(),
                             level=level, class_name=class_name, deadline_at=deadline_at,
                             metadata=dict(metadata or {}))
        self._active[request_id] = (trace, None)
        self._idle.clear()
        return trace

    def _end(self, trace: RequestTrace, outcome: RequestOutcome) -> None:
        _, cost = self._active.pop(trace.request_id)
        self._counts[outcome] += 1
        self._preemptions += trace.preemptions or 0
        if outcome is RequestOutcome.FINISHED and cost is not None and self._parts is not None:
            self._parts.costs.observe_output(trace.class_name, trace.output_tokens)
        if not self._active:
            self._idle.set()

    def _ticket(self, trace: RequestTrace, slots: int = 1, prompt_tokens: int = 0,
                vision_tokens: int = 0) -> Ticket | None:
        if self._admission is None:
            return None
        return self._admission.ticket(trace.request_id, trace.level, trace.class_name,
                                      trace.deadline_at, slots, prompt_tokens=prompt_tokens,
                                      vision_tokens=vision_tokens)

    def _price(self, trace: RequestTrace, prompt_tokens: int, vision_tokens: int,
               params: Any) -> None:
        """Record what the request costs the engine (the tuner's request mix)."""
        parts = self._running()
        max_tokens = getattr(params, "max_tokens", None) or max(
            1, parts.backend.max_model_len - prompt_tokens)
        cost = parts.costs.cost_from_tokens(prompt_tokens=prompt_tokens,
                                            vision_tokens=vision_tokens,
                                            max_tokens=int(max_tokens),
                                            class_name=trace.class_name)
        self._active[trace.request_id] = (trace, cost)

    async def generate(self, request: PioRequest) -> AsyncIterator[PioOutput]:
        """Stream one request's output. The last item has `finished` and a `result`.

        Raises a PioError subclass for bad input (before any output), shedding, deadline
        expiry or an engine failure. Stopping iteration or cancelling the task aborts it in
        vLLM (or takes it out of pio's queue).
        """
        parts = self._running()
        level, class_name = self.resolve_priority(request.priority)
        params = parts.backend.sampling_params(request.sampling)
        trace = self._begin(request.resolved_id(), level, class_name,
                            self._deadline_at(request), request.metadata)
        async for out in self._generate(request, trace, params):
            yield out

    async def _generate(self, request: PioRequest, trace: RequestTrace,
                        params: Any) -> AsyncIterator[PioOutput]:
        parts = self._running()
        outcome = RequestOutcome.FAILED
        error: BaseException | None = None

        async def prepare() -> Submission:
            prepared = await parts.intake.prepare(request, params)
            trace.prompt_tokens, trace.vision_tokens = (
                prepared.prompt_tokens, prepared.vision_tokens)
            trace.images = prepared.image_infos
            self._price(trace, prepared.prompt_tokens, prepared.vision_tokens, params)
            return Submission(prepared.engine_input(), params)

        try:
            if self._tuning is not None:
                self._tuning.ensure_started()
            prompt_tokens, vision_tokens = estimate_request(
                request, parts.backend.geometry,
                self._settings.admission.unknown_image_vision_tokens)
            ticket = self._ticket(trace, 1, prompt_tokens, vision_tokens)
            async for out in parts.runner.run(trace, ticket, prepare):
                completion = out.outputs[0]
                new_ids = tuple(completion.token_ids)
                trace.token_ids.extend(new_ids)
                trace.text.append(completion.text)
                if not out.finished:
                    if new_ids or completion.text:
                        yield PioOutput(trace.request_id, completion.text, new_ids, False)
                    continue
                result = trace.result(RequestOutcome.FINISHED, None)
                yield PioOutput(trace.request_id, completion.text, new_ids, True,
                                trace.finish_reason, result)
            outcome = RequestOutcome.FINISHED
        except (asyncio.CancelledError, GeneratorExit):
            outcome = RequestOutcome.CANCELLED
            raise
        except PioError as e:
            error = e
            raise
        except Exception as e:  # a bug or an unexpected vLLM error: keep the type, log it
            logger.exception("request %s failed unexpectedly", trace.request_id)
            error = e
            raise
        finally:
            self._end(trace, outcome)
            if request.on_complete is not None:
                self._spawn(self._call_back(request, trace.result(outcome, error)),
                            f"pio-callback-{trace.request_id}")

    async def generate_rendered(
        self,
        engine_input: Any,
        sampling_params: Any,
        request_id: str,
        *,
        priority: int,
        priority_class: str,
        ticket: Ticket | None = None,
        deadline_at: float | None = None,
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Serve a prompt that vLLM's own renderer already processed (the OpenAI server's
        path); yields vLLM RequestOutputs as `AsyncLLM.generate` would, in the caller's
        output kind.

        `ticket`: the admission place the server's gate already waited for (PREPARING);
        None: wait in pio's queue here (a second prompt of the same HTTP request, or a
        caller without the gate).
        """
        self._running()
        if not isinstance(engine_input, dict):
            raise InvalidRequestError(
                f"request {request_id}: prompt of type {type(engine_input).__name__} is not "
                "served through pio; accepted: a rendered prompt dict (streaming input is not)")
        trace = self._begin(request_id, priority, priority_class, deadline_at)
        n = int(getattr(sampling_params, "n", 1) or 1)
        placeholders = (engine_input.get("mm_placeholders") or {}).get("image") or []
        vision = sum(int(getattr(p, "length", 0)) for p in placeholders)
        prompt_len = len(engine_input.get("prompt_token_ids") or ())
        if ticket is None:
            ticket = self._ticket(trace, n, prompt_len, vision)
        elif self.admission is not None:  # priced from the body's estimate at arrival
            self.admission.reprice(ticket, prompt_len, vision)
        trace.prompt_tokens, trace.vision_tokens = prompt_len, vision
        self._price(trace, prompt_len, vision, sampling_params)
        submission = Submission(engine_input, sampling_params, dict(vllm_kwargs or {}))

        async def prepare() -> Submission:
            return submission

        outcome = RequestOutcome.FAILED
        try:
            if self._tuning is not None:
                self._tuning.ensure_started()
            async for out in self._running().runner.run(trace, ticket, prepare):
                yield out
            outcome = RequestOutcome.FINISHED
        except (asyncio.CancelledError, GeneratorExit):
            outcome = RequestOutcome.CANCELLED
            raise
        finally:
            self._end(trace, outcome)

    def _request_mix(self) -> RequestMix:
        costs = [c for _, c in self._active.values() if c is not None]
        if not costs:
            return RequestMix(0, 0.0, 0.0)
        with_images = [c.vision_tokens for c in costs if c.vision_tokens]
        return RequestMix(
            requests=len(costs),
            mean_kv_blocks=sum(c.kv_blocks for c in costs) / len(costs),
            mean_image_vision_tokens=sum(with_images) / len(with_images) if with_images
            else 0.0,
        )

    async def _call_back(self, request: PioRequest, result: RequestResult) -> None:
        assert request.on_complete is not None
        try:
            ret = request.on_complete(result)
            if inspect.isawaitable(ret):
                await ret
        except Exception:
            logger.exception("on_complete callback of request %s raised", result.request_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=task.exception())

    # -- helpers on top -----------------------------------------------------------------

    async def complete(self, request: PioRequest) -> RequestResult:
        """Run one request to the end; return its result (raises on failure)."""
        result: RequestResult | None = None
        async for out in self.generate(request):
            if out.result is not None:
                result = out.result
        assert result is not None
        return result

    async def generate_batch(
        self, requests: Sequence[PioRequest], max_concurrency: int | None = None
    ) -> list[RequestResult]:
        """Run `requests` concurrently; results in input order.

        A request that fails yields a RequestResult with outcome FAILED, `error` set, and
        its real priority and timings; the others are unaffected.
        """
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(request: PioRequest) -> RequestResult:
            if gate is None:
                return await self._result_of(request)
            async with gate:
                return await self._result_of(request)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _result_of(self, request: PioRequest) -> RequestResult:
        """The request's RequestResult, a failure included (never raises a PioError)."""
        rid = request.resolved_id()
        try:
            parts = self._running()
            level, class_name = self.resolve_priority(request.priority)
            params = parts.backend.sampling_params(request.sampling)
            trace = self._begin(rid, level, class_name, self._deadline_at(request),
                                request.metadata)
        except PioError as e:  # refused before it started (bad priority, sampling, id)
            resolved: tuple[int | None, str | None] = (None, None)
            with contextlib.suppress(PioError):
                resolved = self.resolve_priority(request.priority)
            now = self._clock()
            return RequestResult(
                request_id=rid, outcome=RequestOutcome.FAILED, text="", token_ids=(),
                finish_reason=None, prompt_tokens=0, vision_tokens=0, images=(),
                priority=resolved[0], priority_class=resolved[1],
                metadata=dict(request.metadata),
                timings=RequestTimings(time.time(), now, finished_at=now), error=e)
        try:
            async for out in self._generate(request, trace, params):
                if out.result is not None:
                    return out.result
        except PioError as e:
            return trace.result(RequestOutcome.FAILED, e)
        raise EngineDeadError(f"request {rid}: the stream ended without a result")
