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
from pio_vllm.cost.request_cost import CostModel, RequestCost
from pio_vllm.cost.vision_tokens import vision_tokens
from pio_vllm.engine.batch_tuning import TuningLoop
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
from pio_vllm.tuning.batch_tuner import RequestMix, TunerStats

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


@dataclass(frozen=True)
class _Submission:
    """What goes to vLLM for one request, whichever front end built it."""

    request_id: str
    prompt: dict[str, Any]  # vLLM prompt: prompt_token_ids plus images or processed inputs
    sampling_params: Any  # DELTA outputs
    priority: int
    deadline_at: float | None  # monotonic
    preemptible: bool  # resuming from prompt + streamed tokens reproduces the output
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra AsyncLLM.generate args


@dataclass(frozen=True)
class _Step:
    """One vLLM output of a request, with the text pio decoded for it."""

    output: Any  # vllm RequestOutput (DELTA)
    new_ids: tuple[int, ...]
    delta: str
    final: bool  # the request finished (a preempted attempt's last step is not final)


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
    prepared_at: float | None = None
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
    abort_error: PioError | None = None  # set when pio itself aborts it (shutdown)
    cost: RequestCost | None = None

    def timings(self) -> RequestTimings:
        return RequestTimings(
            arrival_wall=self.arrival_wall,
            arrival_at=self.arrival_at,
            submitted_at=self.submitted_at,
            prepared_at=self.prepared_at,
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
    tuning: TunerStats | None


def _stitch(out: Any, step: _Step, tracker: _Tracker, kind: Any,
            engine_input: dict[str, Any]) -> Any | None:
    """Rewrite a DELTA output of a (possibly resumed) attempt as the caller's request would
    have produced it in its `output_kind`; None when that kind emits nothing for this step.
    Reads vLLM's RequestOutput / CompletionOutput fields (0.23 and 0.32)."""
    from vllm.sampling_params import RequestOutputKind

    if kind == RequestOutputKind.FINAL_ONLY and not step.final:
        return None
    out.request_id = tracker.request_id
    out.prompt_token_ids = engine_input["prompt_token_ids"]
    out.prompt = engine_input.get("prompt")
    completion = out.outputs[0]
    if kind == RequestOutputKind.DELTA:
        completion.text, completion.token_ids = step.delta, list(step.new_ids)
    else:
        completion.text, completion.token_ids = "".join(tracker.text), list(tracker.token_ids)
    if not step.final:  # a preempted attempt's abort is not the request's end
        out.finished = False
        completion.finish_reason = completion.stop_reason = None
    return out


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
        self._costs: CostModel | None = None
        self._tuning: TuningLoop | None = None
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

    def start_blocking(self, usage_context: Any | None = None) -> None:
        """Start vLLM from synchronous code; vLLM's output loop starts on the first request.

        `usage_context`: vLLM's UsageContext (the server passes OPENAI_API_SERVER)."""
        if self._backend is not None:
            return
        if self._closed:
            raise EngineNotRunningError("this PioEngine was shut down; create a new one")
        self._backend = backend = VllmBackend.start(self._settings, usage_context)
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
        self._costs = CostModel(backend.geometry, backend.block_size)
        if self._settings.tuning.enabled:
            self._tuning = TuningLoop(
                self._settings.tuning, backend, self._admission, self._request_mix,
                admission.kv_high_watermark, self._registry)
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
        if self._tuning is not None:
            await self._tuning.aclose()
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
            tuning=self._tuning.stats() if self._tuning is not None else None,
        )

    @property
    def closed(self) -> bool:
        """True once shutdown() has begun."""
        return self._closed

    def active_requests(self) -> int:
        """Requests pio holds (queued in admission or running in vLLM)."""
        return len(self._active)

    async def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests by pio id (their current vLLM attempt) or by vLLM id."""
        backend = self.backend
        for rid in request_ids:
            tracker = self._active.get(rid)
            await backend.abort(tracker.vllm_id or rid if tracker is not None else rid)

    async def abort_all(self, reason: str) -> None:
        """Fail every request pio holds with EngineNotRunningError(`reason`): queued ones
        leave the queue, running ones are aborted in vLLM. New requests are refused."""
        if self._admission is not None:
            self._admission.close()
        backend = self.backend
        for tracker in list(self._active.values()):
            tracker.abort_error = EngineNotRunningError(f"request {tracker.request_id}: {reason}")
            if tracker.submitted_at is not None:
                await backend.abort(tracker.vllm_id or tracker.request_id)

    @property
    def tuning(self) -> TuningLoop | None:
        """The batch-tuning loop (None unless tuning.enabled)."""
        return self._tuning

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
        ticket: Ticket | None = None
        try:
            deadline = self._deadline_at(request)
            ticket = self._reserve(request, rid, deadline)
            prepared = await self._prepare_within_deadline(request, rid, deadline)
            tracker.prepared_at = self._clock()
            tracker.priority, tracker.priority_class = prepared.priority, prepared.priority_class
            tracker.prompt_tokens, tracker.vision_tokens = (
                prepared.prompt_tokens, prepared.vision_tokens)
            tracker.images = prepared.image_infos
            tracker.cost = self._cost(prepared.prompt_tokens, prepared.vision_tokens,
                                      prepared.sampling_params, prepared.priority_class)
            async for step in self._serve(self._submission(prepared), tracker, ticket):
                if not step.final:
                    yield PioOutput(rid, step.delta, step.new_ids, finished=False)
                    continue
                result = self._result(tracker, request, RequestOutcome.FINISHED, None)
                yield PioOutput(rid, step.delta, step.new_ids, True, tracker.finish_reason,
                                result)
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
            if ticket is not None and self._admission is not None:
                self._admission.cancel_reservation(ticket)  # intake failed before admission
            if tracker.finished_at is None:
                tracker.finished_at = self._clock()
            self._counts[outcome] += 1
            if request.on_complete is not None:
                result = self._result(tracker, request, outcome, error)
                self._spawn(self._call_back(request, result), f"pio-callback-{rid}")

    @staticmethod
    def _submission(prepared: PreparedRequest) -> _Submission:
        prompt: dict[str, Any] = {"prompt_token_ids": prepared.prompt_token_ids}
        if prepared.images:
            prompt["multi_modal_data"] = {"image": [img.image for img in prepared.images]}
        return _Submission(
            request_id=prepared.request_id, prompt=prompt,
            sampling_params=prepared.sampling_params, priority=prepared.priority,
            deadline_at=prepared.deadline_at, preemptible=True,
        )

    async def generate_rendered(
        self,
        engine_input: Any,
        sampling_params: Any,
        request_id: str,
        *,
        priority: int,
        priority_class: str | None = None,
        ticket: Ticket | None = None,
        deadline_at: float | None = None,
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Serve a prompt that vLLM's own renderer already processed (the OpenAI server's
        path) through pio's admission; yields vLLM RequestOutputs as `AsyncLLM.generate`
        would, in the caller's `output_kind`.

        `ticket`: a queue place reserved earlier with `admission.reserve`. A request is
        preemptible (resumed from its prompt plus streamed tokens) when it has one sequence
        and no logprobs, so that a resumed run's outputs can be stitched exactly; otherwise
        it keeps its slot until it ends.
        """
        from vllm.sampling_params import RequestOutputKind

        self.backend  # noqa: B018  (raises if not running / dead)
        if request_id in self._active:
            raise InvalidRequestError(
                f"request_id {request_id!r} is already in flight; ids must be unique")
        tracker = _Tracker(request_id, arrival_wall=time.time(), arrival_at=self._clock(),
                           priority=priority, priority_class=priority_class)
        kind = getattr(sampling_params, "output_kind", RequestOutputKind.CUMULATIVE)
        preemptible = (
            isinstance(engine_input, dict) and "prompt_token_ids" in engine_input
            and engine_input.get("type") != "enc_dec"
            and getattr(sampling_params, "n", 1) == 1
            and getattr(sampling_params, "logprobs", None) is None
            and getattr(sampling_params, "prompt_logprobs", None) is None
        )
        params = sampling_params
        if preemptible:
            params = sampling_params.clone()
            params.output_kind = RequestOutputKind.DELTA
        if not isinstance(engine_input, dict):
            raise InvalidRequestError(
                f"request {request_id}: prompt of type {type(engine_input).__name__} is not "
                "served through pio; accepted: a rendered prompt dict (streaming input is not)")
        sub = _Submission(
            request_id=request_id, prompt=engine_input, sampling_params=params,
            priority=priority, deadline_at=deadline_at, preemptible=preemptible,
            vllm_kwargs=dict(vllm_kwargs or {}),
        )
        placeholders = (engine_input.get("mm_placeholders") or {}).get("image") or []
        tracker.cost = self._cost(len(engine_input.get("prompt_token_ids") or ()),
                                  sum(int(getattr(p, "length", 0)) for p in placeholders),
                                  sampling_params, priority_class)
        self._active[request_id] = tracker
        outcome = RequestOutcome.FAILED
        try:
            async for step in self._serve(sub, tracker, ticket):
                out = step.output
                if preemptible:
                    out = _stitch(out, step, tracker, kind, engine_input)
                    if out is None:
                        continue
                yield out
            outcome = RequestOutcome.FINISHED
        except (asyncio.CancelledError, GeneratorExit):
            outcome = RequestOutcome.CANCELLED
            raise
        finally:
            del self._active[request_id]
            self._counts[outcome] += 1

    def _reserve(self, request: PioRequest, rid: str, deadline: float | None) -> Ticket | None:
        """Admission's shed decision before any intake work: a request that will be refused
        (429-style RequestRejectedError) costs no image decoding."""
        if self._admission is None:
            return None
        level, class_name = self.resolve_priority(request.priority)
        ticket = self._admission.ticket(rid, level, class_name, deadline)
        self._admission.reserve(ticket)
        return ticket

    async def _prepare_within_deadline(self, request: PioRequest, rid: str,
                                       deadline: float | None) -> PreparedRequest:
        if deadline is None:
            return await self.prepare(request, rid, None)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return await self.prepare(request, rid, deadline)
        except TimeoutError as e:
            raise DeadlineExceededError(
                f"request {rid}: deadline passed during intake (images, prompt)"
            ) from e

    def _cost(self, prompt_tokens: int, vision_tokens: int, params: Any,
              class_name: str | None) -> RequestCost:
        assert self._costs is not None
        max_tokens = getattr(params, "max_tokens", None) or max(
            1, self.backend.max_model_len - prompt_tokens)
        return self._costs.cost_from_tokens(prompt_tokens=prompt_tokens,
                                            vision_tokens=vision_tokens,
                                            max_tokens=int(max_tokens), class_name=class_name)

    def _request_mix(self) -> RequestMix:
        costs = [t.cost for t in self._active.values() if t.cost is not None]
        if not costs:
            return RequestMix(0, 0.0, 0.0)
        with_images = [c.vision_tokens for c in costs if c.vision_tokens]
        return RequestMix(
            requests=len(costs),
            mean_kv_blocks=sum(c.kv_blocks for c in costs) / len(costs),
            mean_image_vision_tokens=sum(with_images) / len(with_images) if with_images
            else 0.0,
        )

    async def _serve(
        self, sub: _Submission, tracker: _Tracker, ticket: Ticket | None = None
    ) -> AsyncIterator[_Step]:
        """Admission, then vLLM attempts until the request ends; a preempted attempt is
        resumed from the prompt plus the tokens the caller already has. `ticket`: a place
        the caller reserved with `AdmissionController.reserve` (None: take one here)."""
        admission = self._admission
        release = Release.FAILED
        if self._tuning is not None:
            self._tuning.ensure_started()
        timer = self._arm_deadline(sub.deadline_at, tracker)
        try:
            if admission is not None:
                if ticket is None:
                    ticket = admission.ticket(sub.request_id, sub.priority,
                                              tracker.priority_class, sub.deadline_at)
                ticket.request_id = sub.request_id
                if sub.preemptible:
                    ticket.preempt_hook = functools.partial(self._preempt, tracker)
                tracker.ticket = ticket
                await admission.admit(ticket)
            while True:
                async for step in self._attempt(sub, tracker):
                    yield step
                if not tracker.preempted:
                    release = Release.COMPLETED
                    if (self._costs is not None and sub.preemptible
                            and tracker.finish_reason != "abort"):
                        self._costs.observe_output(tracker.priority_class,
                                                   len(tracker.token_ids))
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
                admission.cancel_reservation(ticket)
                admission.release(ticket, release)

    def _preempt(self, tracker: _Tracker) -> None:
        """Admission's hook: abort the current vLLM attempt; `_attempt` sees it end."""
        self._spawn(self.backend.abort(tracker.vllm_id), f"pio-preempt-{tracker.vllm_id}")

    async def _attempt(self, sub: _Submission, tracker: _Tracker) -> AsyncIterator[_Step]:
        """One vLLM request for `sub`, continuing after the tokens `tracker` already has.

        Yields a step per output that carries tokens or text and always the final one; after
        a preemption the last step is not final and `tracker.preempted` is set."""
        backend = self.backend
        rid = sub.request_id
        done_tokens = len(tracker.token_ids)
        prompt = dict(sub.prompt)
        params = sub.sampling_params
        decode: Callable[[int], str] | None = None
        if done_tokens:
            prompt.pop("prompt", None)  # the text no longer matches the token ids
            prompt["prompt_token_ids"] = list(sub.prompt["prompt_token_ids"]) + tracker.token_ids
            params = backend.resume_params(params, done_tokens)
            decode = backend.resume_decoder(
                list(sub.prompt["prompt_token_ids"]), tracker.token_ids, sub.sampling_params)
        # A fresh vLLM id per attempt: the aborted one may still be draining in EngineCore.
        tracker.vllm_id = rid if tracker.preemptions == 0 else f"{rid}#resume{tracker.preemptions}"
        ticket = tracker.ticket
        if tracker.submitted_at is None:
            tracker.submitted_at = self._clock()
        ended = False
        try:
            stream = backend.generate(prompt, params, tracker.vllm_id, sub.priority,
                                      **sub.vllm_kwargs)
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
                    if sub.preemptible:  # others are passed through, never resumed
                        tracker.token_ids.extend(new_ids)
                        tracker.text.append(delta)
                        if ticket is not None:
                            ticket.output_tokens = len(tracker.token_ids)
                    if not out.finished:
                        if new_ids or delta:
                            yield _Step(out, new_ids, delta, final=False)
                        continue
                    reason = completion.finish_reason if completion is not None else None
                    if tracker.abort_error is not None:
                        raise tracker.abort_error
                    if tracker.expired:
                        raise DeadlineExceededError(
                            f"request {rid}: deadline passed after {len(tracker.token_ids)} "
                            "output tokens; aborted in vLLM"
                        )
                    ended = True
                    if reason == "abort" and ticket is not None and ticket.preempt_requested:
                        tracker.preempted = True
                        if new_ids or delta:
                            yield _Step(out, new_ids, delta, final=False)
                        return
                    tracker.finish_reason = reason
                    tracker.finished_at = self._clock()
                    yield _Step(out, new_ids, delta, final=True)
                    return
            if tracker.expired:
                raise DeadlineExceededError(f"request {rid}: deadline passed; aborted in vLLM")
            raise EngineDeadError(f"request {rid}: vLLM's stream ended without a final output")
        finally:
            if not ended:
                # Cancellation, deadline or error: make sure vLLM drops the request.
                with contextlib.suppress(Exception):
                    await backend.abort(tracker.vllm_id)

    def _arm_deadline(self, deadline_at: float | None, tracker: _Tracker) -> Any:
        if deadline_at is None:
            return None
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline_at - self._clock())

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
