"""A replica's frontend in the simulator: pio's production AdmissionController, or plain
vLLM's arrival-order frontend (runs on the simulator's virtual-time asyncio loop).

Both prepare a request on one rendering thread (vLLM's multimodal executor is one thread per
API-server process; in-process, vLLM's input processing runs on the caller's event loop), for
the profile's preparation time, before the engine has it. Plain vLLM prepares every request
in arrival order. pio's requests wait in its queue first, as `RequestRunner` drives the
controller: `ticket` -> `admit` (queue, shedding, SLO pricing) -> prepared -> `started` ->
the engine -> `observe_ttft` -> `observe_finish` -> `release`, with the engine's per-step
stats fed to `update_engine` and the profile's linear terms as the fitted step model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pio_vllm.admission.controller import AdmissionController, Release
from pio_vllm.admission.slo_policy import WorkModel
from pio_vllm.errors import DeadlineExceededError, RequestRejectedError
from pio_vllm.settings import PioSettings
from pio_vllm.sim.engine import ModelledEngine, RequestState
from pio_vllm.sim.profile import SimProfile


@dataclass
class Outcome:
    """What became of one request (one replica's attempt)."""

    request_id: str
    priority_class: str
    ok: bool = False
    refused: bool = False  # 429: the router may retry it elsewhere
    expired: bool = False
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    priority_class: str
    level: int
    arrival_at: float
    prompt_tokens: int  # text
    vision_tokens: int
    output_tokens: int
    seed: int


class PlainFrontend:
    """vLLM's own frontend: every request is prepared in arrival order and sent in."""

    def __init__(self, engine: ModelledEngine, profile: SimProfile) -> None:
        self.engine = engine
        self._profile = profile
        self._renderer = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in order

    def load(self) -> int:
        return self.engine.in_flight()

    async def serve(self, req: SimRequest) -> Outcome:
        outcome = Outcome(req.request_id, req.priority_class)
        if not self.engine.fits(req.prompt_tokens, req.vision_tokens, req.output_tokens):
            outcome.error = "prompt too long"
            return outcome
        async with self._renderer:
            await asyncio.sleep(self._profile.prep_s(req.vision_tokens))
        state = self.engine.submit(req.request_id, req.prompt_tokens, req.vision_tokens,
                                   req.output_tokens, req.level, req.seed)
        return await _follow(state, req, outcome)


class PioFrontend:
    """pio's admission in front of the engine (its production controller)."""

    def __init__(self, engine: ModelledEngine, profile: SimProfile, settings: PioSettings,
                 *, vllm_renders: bool) -> None:
        self.engine = engine
        self._profile = profile
        admission = settings.admission
        capacity = admission.max_in_flight or engine.max_num_seqs + admission.lookahead
        loop = asyncio.get_running_loop()
        self.admission = AdmissionController(
            admission, settings.priority_classes, settings.default_priority_class, capacity,
            clock=loop.time, bound_top_class=not vllm_renders)
        if settings.slo_admission_on():  # the online fit, taken as the profile's terms
            self.admission.set_work_model(WorkModel(
                profile.base_s, profile.per_token_s, profile.per_vision_token_s))
        controller = self.admission
        engine.listeners.append(lambda s: controller.update_engine(
            s.kv_cache_usage, s.num_running, s.inter_token_s_total, s.inter_tokens_total))
        self._renderer = asyncio.Lock()

    def load(self) -> int:
        return self.admission.load()

    async def serve(self, req: SimRequest) -> Outcome:
        outcome = Outcome(req.request_id, req.priority_class)
        if not self.engine.fits(req.prompt_tokens, req.vision_tokens, req.output_tokens):
            outcome.error = "prompt too long"  # pio's intake refuses it (PromptTooLongError)
            return outcome
        ticket = self.admission.ticket(
            req.request_id, req.level, req.priority_class, None,
            prompt_tokens=req.prompt_tokens + req.vision_tokens,
            vision_tokens=req.vision_tokens)
        try:
            await self.admission.admit(ticket)
        except RequestRejectedError as e:
            outcome.refused, outcome.error = True, f"RequestRejectedError: {e.reason}"
            return outcome
        except DeadlineExceededError:
            outcome.expired, outcome.error = True, "DeadlineExceededError"
            return outcome
        try:
            async with self._renderer:
                await asyncio.sleep(self._profile.prep_s(req.vision_tokens))
            self.admission.started(ticket)
            state = self.engine.submit(req.request_id, req.prompt_tokens, req.vision_tokens,
                                       req.output_tokens, ticket.level, req.seed)
            await state.first.wait()
            if state.first_token_at is not None:
                self.admission.observe_ttft(ticket, state.first_token_at - ticket.arrival_at)
            result = await _follow(state, req, outcome)
            self.admission.observe_finish(ticket, result.ttft_s, result.tpot_s)
        except BaseException:
            self.admission.release(ticket, Release.CANCELLED)
            raise
        self.admission.release(ticket, Release.COMPLETED)
        return result


async def _follow(state: RequestState, req: SimRequest, outcome: Outcome) -> Outcome:
    await state.done.wait()
    outcome.ok = state.finished_at is not None
    outcome.output_tokens = state.output_tokens
    if state.first_token_at is not None:
        outcome.ttft_s = state.first_token_at - req.arrival_at
    if state.finished_at is not None:
        outcome.e2e_s = state.finished_at - req.arrival_at
        if state.first_token_at is not None and state.output_tokens > 1:
            outcome.tpot_s = (state.finished_at - state.first_token_at) / (
                state.output_tokens - 1)
    return outcome


Frontend = PlainFrontend | PioFrontend


def side_settings(settings: PioSettings, side: str) -> PioSettings:
    """The settings a side runs with: pio's as given; plain vLLM's engine arguments alone
    (no admission, no pio scheduler)."""
    if side == "pio":
        return settings
    update: dict[str, Any] = {
        "admission": settings.admission.model_copy(update={
            "enabled": False, "preemption": False, "slo_admission": False}),
        "tuning": settings.tuning.model_copy(update={"enabled": False}),
    }
    return settings.model_copy(update=update)
