"""PioEngine: pio's async engine over vLLM's AsyncLLM (frontend process, asyncio).

    async with PioEngine.from_settings(settings) as engine:
        async for out in engine.generate(PioRequest(prompt="Describe", images=[img])):
            print(out.text_delta, end="")

A request flows: priority and sampling checks -> prompt rendering (chat template) -> image
intake (thread pool, content-hash cache) -> token count and context check -> vLLM (as token
ids plus images, with the priority) -> delta outputs -> final RequestResult (timings, token
counts) -> completion callback. Cancelling the consumer, closing the stream, or a deadline
passing aborts the request in vLLM. The EngineCore and its worker run in child processes
that vLLM spawns; this object lives in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pio_vllm.admission.controller import (
    AdmissionController,
    AdmissionStats,
    Release,
    Ticket,
)
from pio_vllm.cost.vision_tokens import vision_tokens
from pio_vllm.engine.stats_probe import EngineStats
from pio_vllm.engine.vllm_backend import VllmBackend
from pio_vllm.errors import (
    DeadlineExceededError,
    EngineDeadError,
    EngineNotRunningError,
    ImageError,
    InvalidRequestError,
    PioError,
    UnknownPriorityError,
)
from pio_vllm.intake.image_loader import ImageCacheStats, ImageLoader, LoadedImage
from pio_vllm.intake.prompt_renderer import render_prompt
from pio_vllm.request import (
    ImageInfo,
    PioOutput,
    PioRequest,
    RequestOutcome,
    RequestResult,
    RequestTimings,
)
from pio_vllm.settings import PioSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready for vLLM."""

    request_id: str
    prompt_token_ids: list[int]
    images: list[LoadedImage]
    image_infos: tuple[ImageInfo, ...]
    prompt_tokens: int  # text tokens plus vision tokens, as vLLM will count them
    vision_tokens: int
    sampling_params: Any
    priority: int
    priority_class: str | None
    deadline_at: float | None  # monotonic


@dataclass
class _Tracker:
    """Mutable state of one request while it runs."""

    request_id: str
    arrival_wall: float
    arrival_at: float
    priority: int = 0
    priority_class: str | None = None
    submitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    vision_tokens: int = 0
    images: tuple[ImageInfo, ...] = ()
    expired: bool = False
    preempted: bool = False  # the current vLLM attempt ended by preemption
    preemptions: int = 0
    vllm_id: str = ""
    ticket: Ticket | None = None

    def timings(self) -> RequestTimings:
        return RequestTimings(
            arrival_wall=self.arrival_wall,
            arrival_at=self.arrival_at,
            submitted_at=self.submitted_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
        )


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


class PioEngine:
    """Priority-aware async engine for Qwen3-VL over vLLM. Use as an async context manager."""

    def __init__(
        self,
        settings: PioSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        registry: Any | None = None,
    ) -> None:
        """`registry`: a prometheus_client registry for pio's metrics (None: a private one)."""
        from prometheus_client import CollectorRegistry

        self._settings = settings
        self._clock = clock
        self._registry = registry if registry is not None else CollectorRegistry()
        self._backend: VllmBackend | None = None
        self._images: ImageLoader | None = None
        self._admission: AdmissionController | None = None
        self._active: dict[str, _Tracker] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._counts = {o: 0 for o in RequestOutcome}
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

    def start_blocking(self) -> None:
        """Start vLLM from synchronous code; vLLM's output loop starts on the first request."""
        if self._backend is not None:
            return
        if self._closed:
            raise EngineNotRunningError("this PioEngine was shut down; create a new one")
        self._backend = backend = VllmBackend.start(self._settings)
        self._images = ImageLoader(self._settings.images)
        admission = self._settings.admission
        if admission.enabled:
            window = admission.max_in_flight or backend.max_num_seqs
            self._admission = AdmissionController(
                admission, self._settings.priority_classes,
                self._settings.default_priority_class, window,
                clock=self._clock, registry=self._registry,
            )
            controller = self._admission
            backend.probe.add_listener(lambda st: controller.update_kv_usage(st.kv_cache_usage))
        levels = {c.level for c in self._settings.priority_classes.values()}
        if self._backend.scheduling_policy != "priority" and len(levels) > 1:
            logger.warning(
                "vLLM scheduling_policy is %r: vLLM ignores request priorities; set "
                "engine.scheduling_policy: priority to order its waiting queue",
                self._backend.scheduling_policy,
            )

    async def shutdown(self) -> None:
        """Abort what runs, wait for callbacks, stop vLLM's processes."""
        if self._closed:
            return
        self._closed = True
        if self._admission is not None:
            self._admission.close()
        backend, self._backend = self._backend, None
        if backend is not None:
            for tracker in list(self._active.values()):
                with contextlib.suppress(Exception):
                    await backend.abort(tracker.vllm_id or tracker.request_id)
        if self._background:
            await asyncio.wait(list(self._background), timeout=self._settings.shutdown_timeout_s)
        if self._images is not None:
            await self._images.aclose()
        if backend is not None:
            backend.shutdown()

    @property
    def backend(self) -> VllmBackend:
        """The vLLM adapter (raises EngineNotRunningError before start / after shutdown)."""
        if self._backend is None:
            raise EngineNotRunningError(
                "PioEngine is not running; use `async with PioEngine.from_settings(...)`"
            )
        if self._backend.errored:
            raise EngineDeadError("the vLLM engine has died; restart the engine")
        return self._backend

    @property
    def settings(self) -> PioSettings:
        return self._settings

    def stats(self) -> EngineSnapshot:
        backend = self.backend
        assert self._images is not None
        return EngineSnapshot(
            active_requests=len(self._active),
            completed=self._counts[RequestOutcome.FINISHED],
            failed=self._counts[RequestOutcome.FAILED],
            cancelled=self._counts[RequestOutcome.CANCELLED],
            vllm_unfinished=backend.num_unfinished(),
            engine=backend.probe.snapshot(),
            image_cache=self._images.stats(),
            engine_start_s=backend.start_s,
            admission=self._admission.stats() if self._admission is not None else None,
        )

    @property
    def admission(self) -> AdmissionController | None:
        """The admission controller (None when admission is disabled)."""
        return self._admission

    @property
    def registry(self) -> Any:
        """The prometheus_client registry holding pio's metrics."""
        return self._registry

    # -- requests -----------------------------------------------------------------------

    def resolve_priority(self, priority: str | int | None) -> tuple[int, str | None]:
        """(vLLM level, class name) for a request's priority; lower level is served first."""
        classes = self._settings.priority_classes
        if priority is None:
            name = self._settings.default_priority_class
            return classes[name].level, name
        if isinstance(priority, bool) or not isinstance(priority, int | str):
            raise UnknownPriorityError(
                f"priority {priority!r} is neither a class name nor an integer level; "
                f"classes: {self._class_list()}"
            )
        if isinstance(priority, str):
            if priority not in classes:
                raise UnknownPriorityError(
                    f"unknown priority class {priority!r}; accepted: {self._class_list()} "
                    "or an integer level"
                )
            return classes[priority].level, priority
        found = next((n for n, c in classes.items() if c.level == priority), None)
        return priority, found

    def _class_list(self) -> str:
        items = sorted(self._settings.priority_classes.items(), key=lambda kv: kv[1].level)
        return ", ".join(f"{n} (level {c.level})" for n, c in items)

    async def prepare(
        self, request: PioRequest, request_id: str, deadline_at: float | None = None
    ) -> PreparedRequest:
        """Validate `request`, render its prompt and load its images (no vLLM call).

        `deadline_at` (monotonic) is the request's deadline if the caller already computed
        it; otherwise it is derived from `request.deadline` / `timeout_s`."""
        backend = self.backend
        assert self._images is not None
        level, class_name = self.resolve_priority(request.priority)
        params = backend.sampling_params(request.sampling)
        if deadline_at is None:
            deadline_at = self._deadline_at(request)
        limit = self._settings.images.max_images_per_request
        max_images = backend.max_images_engine if limit is None else min(
            limit, backend.max_images_engine)
        rendered = render_prompt(request, backend.tokenizer, max_images)
        loaded = await self._images.load_all(rendered.images)
        infos = []
        for i, img in enumerate(loaded):
            try:
                n = vision_tokens(img.width, img.height, backend.geometry)
            except ValueError as e:
                raise ImageError(f"{e}; accepted aspect ratios are up to 200:1", i) from e
            infos.append(ImageInfo(img.width, img.height, n, img.content_hash))
        token_ids = backend.tokenizer.encode(rendered.text, add_special_tokens=False)
        n_vision = sum(info.vision_tokens for info in infos)
        prompt_tokens = len(token_ids) - len(infos) + n_vision
        backend.check_prompt_len(prompt_tokens)
        return PreparedRequest(
            request_id=request_id,
            prompt_token_ids=list(token_ids),
            images=loaded,
            image_infos=tuple(infos),
            prompt_tokens=prompt_tokens,
            vision_tokens=n_vision,
            sampling_params=params,
            priority=level,
            priority_class=class_name,
            deadline_at=deadline_at,
        )

    def _deadline_at(self, request: PioRequest) -> float | None:
        now_mono, now_wall = self._clock(), time.time()
        candidates = []
        if request.deadline is not None:
            candidates.append(now_mono + (request.deadline - now_wall))
        if request.timeout_s is not None:
            if request.timeout_s <= 0:
                raise InvalidRequestError(
                    f"timeout_s={request.timeout_s} is invalid; accepted: a positive number"
                )
            candidates.append(now_mono + request.timeout_s)
        return min(candidates) if candidates else None

    async def generate(self, request: PioRequest) -> AsyncIterator[PioOutput]:
        """Stream one request's output. The last item has `finished` and a `result`.

        Raises a PioError subclass for bad input (before any output), deadline expiry or an
        engine failure. Stopping iteration or cancelling the task aborts it in vLLM.
        """
        rid = request.resolved_id()
        if rid in self._active:
            raise InvalidRequestError(
                f"request_id {rid!r} is already in flight; ids must be unique"
            )
        tracker = _Tracker(rid, arrival_wall=time.time(), arrival_at=self._clock())
        self._active[rid] = tracker
        outcome = RequestOutcome.FAILED
        error: BaseException | None = None
        try:
            prepared = await self._prepare_within_deadline(request, rid)
            tracker.priority, tracker.priority_class = prepared.priority, prepared.priority_class
            tracker.prompt_tokens, tracker.vision_tokens = (
                prepared.prompt_tokens, prepared.vision_tokens)
            tracker.images = prepared.image_infos
            async for out in self._serve(prepared, tracker, request):
                yield out
            outcome = RequestOutcome.FINISHED
        except (asyncio.CancelledError, GeneratorExit):
            outcome = RequestOutcome.CANCELLED
            raise
        except PioError as e:
            error = e
            raise
        except Exception as e:  # a bug or an unexpected vLLM error: keep the type, log it
            logger.exception("request %s failed unexpectedly", rid)
            error = e
            raise
        finally:
            del self._active[rid]
            if tracker.finished_at is None:
                tracker.finished_at = self._clock()
            self._counts[outcome] += 1
            if request.on_complete is not None:
                result = self._result(tracker, request, outcome, error)
                self._spawn(self._call_back(request, result), f"pio-callback-{rid}")

    async def _prepare_within_deadline(self, request: PioRequest, rid: str) -> PreparedRequest:
        deadline = self._deadline_at(request)
        if deadline is None:
            return await self.prepare(request, rid, None)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return await self.prepare(request, rid, deadline)
        except TimeoutError as e:
            raise DeadlineExceededError(
                f"request {rid}: deadline passed during intake (images, prompt)"
            ) from e

    async def _serve(
        self, prepared: PreparedRequest, tracker: _Tracker, request: PioRequest
    ) -> AsyncIterator[PioOutput]:
        """Admission, then vLLM attempts until the request ends; a preempted attempt is
        resumed from the prompt plus the tokens the caller already has."""
        admission = self._admission
        ticket: Ticket | None = None
        release = Release.FAILED
        timer = self._arm_deadline(prepared, tracker)
        try:
            if admission is not None:
                ticket = admission.ticket(prepared.request_id, prepared.priority,
                                          prepared.priority_class, prepared.deadline_at)
                ticket.preempt_hook = functools.partial(self._preempt, tracker)
                tracker.ticket = ticket
                await admission.admit(ticket)
            while True:
                async for out in self._attempt(prepared, tracker, request):
                    yield out
                if not tracker.preempted:
                    release = Release.COMPLETED
                    return
                # Preempted: give the slot back, wait for a new one, resume.
                assert admission is not None and ticket is not None
                tracker.preempted = False
                tracker.preemptions += 1
                admission.release(ticket, Release.PREEMPTED)
                await admission.admit(ticket, requeue=True)
        except (asyncio.CancelledError, GeneratorExit):
            release = Release.CANCELLED
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if admission is not None and ticket is not None:
                admission.release(ticket, release)

    def _preempt(self, tracker: _Tracker) -> None:
        """Admission's hook: abort the current vLLM attempt; `_attempt` sees it end."""
        self._spawn(self.backend.abort(tracker.vllm_id), f"pio-preempt-{tracker.vllm_id}")

    async def _attempt(
        self, prepared: PreparedRequest, tracker: _Tracker, request: PioRequest
    ) -> AsyncIterator[PioOutput]:
        backend = self.backend
        rid = prepared.request_id
        done_tokens = len(tracker.token_ids)
        prompt: dict[str, Any] = {
            "prompt_token_ids": prepared.prompt_token_ids + tracker.token_ids
        }
        if prepared.images:
            prompt["multi_modal_data"] = {"image": [img.image for img in prepared.images]}
        params = prepared.sampling_params
        decode: Callable[[int], str] | None = None
        if done_tokens:
            params = backend.resume_params(params, done_tokens)
            decode = backend.resume_decoder(
                prepared.prompt_token_ids, tracker.token_ids, prepared.sampling_params)
        # A fresh vLLM id per attempt: the aborted one may still be draining in EngineCore.
        tracker.vllm_id = rid if tracker.preemptions == 0 else f"{rid}#resume{tracker.preemptions}"
        ticket = tracker.ticket
        if tracker.submitted_at is None:
            tracker.submitted_at = self._clock()
        ended = False
        try:
            stream = backend.generate(prompt, params, tracker.vllm_id, prepared.priority)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    completion = out.outputs[0] if out.outputs else None
                    new_ids = tuple(completion.token_ids) if completion is not None else ()
                    delta = completion.text if completion is not None else ""
                    if decode is not None:
                        delta = "".join(decode(t) for t in new_ids)
                    if new_ids and tracker.first_token_at is None:
                        tracker.first_token_at = self._clock()
                        if ticket is not None and self._admission is not None:
                            self._admission.observe_ttft(
                                ticket, tracker.first_token_at - tracker.arrival_at)
                    tracker.token_ids.extend(new_ids)
                    tracker.text.append(delta)
                    if ticket is not None:
                        ticket.output_tokens = len(tracker.token_ids)
                    if not out.finished:
                        if new_ids or delta:
                            yield PioOutput(rid, delta, new_ids, finished=False)
                        continue
                    reason = completion.finish_reason if completion is not None else None
                    if tracker.expired:
                        raise DeadlineExceededError(
                            f"request {rid}: deadline passed after {len(tracker.token_ids)} "
                            "output tokens; aborted in vLLM"
                        )
                    ended = True
                    if reason == "abort" and ticket is not None and ticket.preempt_requested:
                        tracker.preempted = True
                        if new_ids or delta:
                            yield PioOutput(rid, delta, new_ids, finished=False)
                        return
                    tracker.finish_reason = reason
                    tracker.finished_at = self._clock()
                    result = self._result(tracker, request, RequestOutcome.FINISHED, None)
                    yield PioOutput(rid, delta, new_ids, True, reason, result)
                    return
            if tracker.expired:
                raise DeadlineExceededError(f"request {rid}: deadline passed; aborted in vLLM")
            raise EngineDeadError(f"request {rid}: vLLM's stream ended without a final output")
        finally:
            if not ended:
                # Cancellation, deadline or error: make sure vLLM drops the request.
                with contextlib.suppress(Exception):
                    await backend.abort(tracker.vllm_id)

    def _arm_deadline(self, prepared: PreparedRequest, tracker: _Tracker) -> Any:
        if prepared.deadline_at is None:
            return None
        loop = asyncio.get_running_loop()
        delay = max(0.0, prepared.deadline_at - self._clock())

        def expire() -> None:
            tracker.expired = True
            if tracker.submitted_at is not None:
                self._spawn(self.backend.abort(tracker.vllm_id), f"pio-expire-{tracker.vllm_id}")

        return loop.call_later(delay, expire)

    def _result(
        self,
        tracker: _Tracker,
        request: PioRequest,
        outcome: RequestOutcome,
        error: BaseException | None,
    ) -> RequestResult:
        return RequestResult(
            request_id=tracker.request_id,
            outcome=outcome,
            text="".join(tracker.text),
            token_ids=tuple(tracker.token_ids),
            finish_reason=tracker.finish_reason,
            prompt_tokens=tracker.prompt_tokens,
            vision_tokens=tracker.vision_tokens,
            images=tracker.images,
            priority=tracker.priority,
            priority_class=tracker.priority_class,
            metadata=dict(request.metadata),
            timings=tracker.timings(),
            error=error,
            preemptions=tracker.preemptions,
        )

    async def _call_back(self, request: PioRequest, result: RequestResult) -> None:
        assert request.on_complete is not None
        try:
            ret = request.on_complete(result)
            if inspect.isawaitable(ret):
                await ret
        except Exception:
            logger.exception("on_complete callback of request %s raised", result.request_id)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=task.exception())

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

        A request that fails yields a RequestResult with outcome FAILED and `error` set; the
        others are unaffected.
        """
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(req: PioRequest) -> RequestResult:
            rid = req.resolved_id()
            if req.request_id is None:
                req = replace(req, request_id=rid)
            try:
                if gate is None:
                    return await self.complete(req)
                async with gate:
                    return await self.complete(req)
            except Exception as e:
                now = self._clock()
                return RequestResult(
                    request_id=rid, outcome=RequestOutcome.FAILED, text="", token_ids=(),
                    finish_reason=None, prompt_tokens=0, vision_tokens=0, images=(),
                    priority=0, priority_class=None, metadata=dict(req.metadata),
                    timings=RequestTimings(time.time(), now, finished_at=now), error=e,
                )

        return list(await asyncio.gather(*(one(r) for r in requests)))
