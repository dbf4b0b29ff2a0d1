"""RequestRunner: one request's path from pio's queue through vLLM (frontend process, asyncio).

Both front ends share it: `PioEngine.generate()` (intake renders and loads images) and the
OpenAI server (vLLM's serving layer renders). For each request it

1. waits in pio's queue (AdmissionController.admit) unless the server's gate already did,
2. runs the caller's `prepare` step under the request's deadline,
3. submits to vLLM with the request's priority and streams vLLM's outputs back unchanged,
4. aborts the request in vLLM when the caller stops, is cancelled, or the deadline passes,
5. releases its admission place with one outcome, and records first token, output tokens
   and the preemptions vLLM reports.

Preemption happens inside vLLM (patches/priority_preemption.py): the stream just pauses,
so nothing here resumes or re-renders anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pio_vllm.admission.controller import AdmissionController, Release, Ticket, TicketState
from pio_vllm.engine.request_trace import RequestTrace
from pio_vllm.engine.vllm_backend import VllmBackend
from pio_vllm.errors import DeadlineExceededError, EngineDeadError, PioError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """What goes to vLLM for one request, whichever front end built it."""

    prompt: dict[str, Any]  # vLLM prompt: token ids plus images, or processed inputs
    sampling_params: Any
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)  # more AsyncLLM.generate args


class RequestRunner:
    """Runs requests for one PioEngine; `spawn` owns background tasks (aborts)."""

    def __init__(self, backend: VllmBackend, admission: AdmissionController | None,
                 clock: Callable[[], float],
                 spawn: Callable[[Coroutine[Any, Any, Any], str], None]) -> None:
        self._backend = backend
        self._admission = admission
        self._clock = clock
        self._spawn = spawn

    async def run(self, trace: RequestTrace, ticket: Ticket | None,
                  prepare: Callable[[], Awaitable[Submission]]) -> AsyncIterator[Any]:
        """vLLM's RequestOutputs for one request, in its sampling params' output kind.

        `ticket`: its admission place (NEW: wait in the queue here; PREPARING: the server's
        gate already waited); None without admission."""
        admission = self._admission if ticket is not None else None
        release = Release.FAILED
        timer: asyncio.TimerHandle | None = None
        try:
            if admission is not None and ticket is not None and (
                    ticket.state is TicketState.NEW):
                await admission.admit(ticket)
            trace.granted_at = self._clock()
            submission = await self._prepare(trace, prepare)
            trace.prepared_at = self._clock()
            if trace.aborted_by is not None:  # the engine shut down meanwhile
                raise trace.aborted_by
            trace.submitted_at = self._clock()
            if admission is not None and ticket is not None:
                admission.started(ticket)
            timer = self._arm_deadline(trace)
            async for out in self._stream(trace, ticket, submission):
                yield out
            release = Release.COMPLETED
        except DeadlineExceededError:
            release = Release.EXPIRED
            raise
        except (asyncio.CancelledError, GeneratorExit):
            release = Release.CANCELLED
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if trace.finished_at is None:
                trace.finished_at = self._clock()
            if admission is not None and ticket is not None:
                admission.release(ticket, release)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("request %s (%s) %s: %s", trace.request_id, trace.class_name,
                             release.value, stage_times(trace, ticket))

    async def _prepare(self, trace: RequestTrace,
                       prepare: Callable[[], Awaitable[Submission]]) -> Submission:
        if trace.deadline_at is None:
            return await prepare()
        remaining = trace.deadline_at - self._clock()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                return await prepare()
        except TimeoutError as e:
            raise DeadlineExceededError(
                f"request {trace.request_id}: deadline passed before it reached vLLM "
                "(queue, rendering, images)") from e

    async def _stream(self, trace: RequestTrace, ticket: Ticket | None,
                      submission: Submission) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        params = submission.sampling_params
        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        finished = False
        try:
            # a request admission serves late goes to vLLM below every class
            level = trace.level if ticket is None else ticket.level
            stream = self._backend.generate(
                submission.prompt, params, trace.request_id, level, **submission.vllm_kwargs)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    self._observe(trace, ticket, out, delta)
                    if out.finished:
                        if trace.aborted_by is not None:
                            raise trace.aborted_by
                        finished = True
                        trace.finished_at = self._clock()
                    yield out
            if not finished:
                if trace.aborted_by is not None:
                    raise trace.aborted_by
                raise EngineDeadError(
                    f"request {trace.request_id}: vLLM's stream ended without a final output")
        finally:
            if not finished:
                # Cancellation, deadline or error: make sure vLLM drops the request.
                with contextlib.suppress(Exception):
                    await self._backend.abort(trace.request_id)

    def _observe(self, trace: RequestTrace, ticket: Ticket | None, out: Any,
                 delta: bool) -> None:
        produced = max((len(c.token_ids) for c in out.outputs), default=0)
        trace.output_tokens = trace.output_tokens + produced if delta else produced
        # Admission's TTFT counts from the ticket's arrival at pio (the server's gate: in
        # the server the trace begins only after the queue and vLLM's rendering), as its
        # predictions and SLO counters do.
        if produced and trace.first_token_at is None:
            trace.first_token_at = self._clock()
            if ticket is not None and self._admission is not None:
                self._admission.observe_ttft(ticket, trace.first_token_at - ticket.arrival_at)
        metrics = getattr(out, "metrics", None)  # vLLM 0.32 RequestStateStats
        preemptions = getattr(metrics, "num_preemptions", None)
        if preemptions is not None:
            trace.preemptions = int(preemptions)
        if out.finished:
            completion = out.outputs[0] if out.outputs else None
            trace.finish_reason = completion.finish_reason if completion is not None else None
            if ticket is not None and self._admission is not None:
                if trace.preemptions:
                    self._admission.observe_preemptions(ticket, trace.preemptions)
                ttft = None if trace.first_token_at is None else (
                    trace.first_token_at - ticket.arrival_at)
                self._admission.observe_finish(ticket, ttft, trace.tpot_s(self._clock()))

    def _arm_deadline(self, trace: RequestTrace) -> asyncio.TimerHandle | None:
        if trace.deadline_at is None:
            return None
        delay = max(0.0, trace.deadline_at - self._clock())

        def expire() -> None:
            trace.aborted_by = DeadlineExceededError(
                f"request {trace.request_id}: deadline passed after {trace.output_tokens} "
                "output tokens; aborted in vLLM")
            self._spawn(self._backend.abort(trace.request_id),
                        f"pio-expire-{trace.request_id}")

        return asyncio.get_running_loop().call_later(delay, expire)

    def abort(self, trace: RequestTrace, error: PioError) -> None:
        """End a request with `error` (shutdown): abort it in vLLM if it was submitted."""
        trace.aborted_by = error
        if trace.submitted_at is not None:
            self._spawn(self._backend.abort(trace.request_id),
                        f"pio-abort-{trace.request_id}")


def stage_times(trace: RequestTrace, ticket: Ticket | None) -> str:
    """Where a request's time went, in ms from its arrival at pio (the server's gate, or
    generate()): queued in pio, rendered and images loaded (by vLLM's serving layer behind
    the gate, by pio's intake in-process), to vLLM, then to the first token inside vLLM."""
    start = ticket.arrival_at if ticket is not None else trace.arrival_at
    granted = ticket.granted_at if ticket is not None and ticket.granted_at is not None \
        else trace.granted_at
    marks = [("queued", granted), ("rendered", trace.prepared_at),
             ("submitted", trace.submitted_at), ("first token", trace.first_token_at),
             ("finished", trace.finished_at)]
    parts, last = [], start
    for name, at in marks:
        if at is None or last is None:
            break
        parts.append(f"{name} +{(at - last) * 1000:.1f}")
        last = at
    return ", ".join(parts) or "no stage reached"
