"""TuningLoop: applies BatchTuner's limits to pio's admission window and vLLM's scheduler
(frontend process, asyncio; one background task owned here).

Every `tuning.interval_s` it makes one engine-core utility call (`pio_batch_limits`,
patches/engine_core_batch_limits.py) that sets BatchLimitScheduler's limits for the next
steps and returns the steps measured since the previous call; the samples feed the tuner,
whose next decision (for the mix of requests pio holds) becomes the admission capacity
(its running requests plus admission.lookahead) and, on the next call, the scheduler's
limits. Decisions and the fitted model are in
`PioEngine.stats().tuning` and in Prometheus (`pio_batch_*`, `pio_step_model_*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from pio_vllm.admission.controller import AdmissionController
from pio_vllm.admission.slo_policy import WorkModel
from pio_vllm.engine.vllm_backend import VllmBackend
from pio_vllm.settings import TuningSettings
from pio_vllm.tuning.batch_tuner import (
    BatchLimits,
    BatchTuner,
    RequestMix,
    StepSample,
    TunerStats,
)

logger = logging.getLogger(__name__)


class TuningLoop:
    def __init__(self, settings: TuningSettings, backend: VllmBackend,
                 admission: AdmissionController | None, mix: Callable[[], RequestMix],
                 kv_high_watermark: float, lookahead: int, registry: Any | None, *,
                 apply_limits: bool = True) -> None:
        """`apply_limits`: tune the scheduler's limits and the admission capacity (batch
        tuning); off, the loop only fits the step model for SLO admission."""
        self._settings = settings
        self._apply_limits = apply_limits
        self._backend = backend
        self._admission = admission
        self._mix = mix
        self._lookahead = lookahead
        static = BatchLimits(backend.max_num_seqs, backend.max_num_batched_tokens)
        self.tuner = BatchTuner(
            settings, static, kv_blocks_total=backend.kv_blocks_total,
            kv_high_watermark=kv_high_watermark,
            token_floor=min(settings.min_step_tokens, backend.max_num_batched_tokens))
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self.engine_limits: dict[str, Any] = {}
        self._work_model: WorkModel | None = None  # the last fit good enough to price with
        self._gauges = _Gauges(registry) if registry is not None else None

    def ensure_started(self) -> None:
        """Start the loop in the running event loop (first request; idempotent; a no-op
        while paused)."""
        if self._task is None and not self._paused:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pio-tuning")
            self._task.add_done_callback(self._done)

    async def aclose(self) -> None:
        """Stop the loop (it starts again on the next `ensure_started`)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def pause(self) -> None:
        """Stop the loop until `resume`: requests no longer restart it, so nothing reads
        the scheduler's step samples or changes limits and the work model meanwhile."""
        self._paused = True
        await self.aclose()

    def resume(self) -> None:
        self._paused = False
        self.ensure_started()

    def stats(self) -> TunerStats:
        return self.tuner.stats()

    async def step(self) -> BatchLimits:
        """One round: push the current limits, pull samples, refit, decide the next limits."""
        limits = self.tuner.limits
        if self._apply_limits:
            result = await self._backend.batch_limits(
                limits.max_active, limits.max_tokens, self.tuner.token_floor,
                limits.max_encoder_tokens)
        else:
            result = await self._backend.batch_limits(None, None, None, None)
        self.engine_limits = {k: v for k, v in result.items() if k != "samples"}
        self.tuner.observe(StepSample(*s) for s in result.get("samples", ()))
        if self._apply_limits:
            new = self.tuner.decide(self._mix())
            capacity = new.max_active + self._lookahead
            if self._admission is not None and self._admission.capacity != capacity:
                self._admission.set_capacity(capacity)
        else:
            new = limits
            self.tuner.refit()
        model = self.tuner.stats().model
        if model is not None and model.r2 >= self._settings.min_r2:
            self._work_model = WorkModel(
                model.base_s, model.per_token_s, model.per_vision_token_s)
        if self._admission is not None:
            # A poor refit keeps the last good model: a window of near-identical decode
            # steps explains little variance (R^2 falls) although the costs did not change,
            # and dropping the model would turn SLO admission off just as a burst arrives
            # (measured: the first 9 requests of a 3x mixed-resolution run went in unpriced).
            self._admission.set_work_model(self._work_model)
        if self._gauges is not None:
            self._gauges.update(self.tuner.stats())
        return new

    async def _run(self) -> None:
        while not self._backend.errored:
            # Nothing is sent to a dead engine (as vLLM's own abort does not): a utility
            # call to it is never answered, and a server whose engine died (keep-alive on
            # engine death) did not stop on SIGTERM while one was outstanding.
            await self.step()
            await asyncio.sleep(self._settings.interval_s)
        logger.warning("batch tuning stopped: the engine is dead")

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch tuning stopped; static limits stay in force",
                         exc_info=task.exception())


class _Gauges:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Gauge

        self.max_active = Gauge("pio_batch_max_active",
                                "Requests allowed to run at once (tuned)", registry=registry)
        self.max_tokens = Gauge("pio_batch_max_tokens",
                                "Tokens scheduled per engine step (tuned)", registry=registry)
        # The fitted step-time model, one unit per metric.
        self.base = Gauge("pio_step_model_base_seconds",
                          "Fitted engine step time with nothing scheduled", registry=registry)
        self.per_token = Gauge("pio_step_model_seconds_per_token",
                               "Fitted engine step time per scheduled token",
                               registry=registry)
        self.per_vision = Gauge("pio_step_model_seconds_per_vision_token",
                                "Fitted engine step time per vision token encoded",
                                registry=registry)
        self.r2 = Gauge("pio_step_model_r2",
                        "Share of step-time variance the fitted model explains (R^2)",
                        registry=registry)

    def update(self, stats: TunerStats) -> None:
        self.max_active.set(stats.limits.max_active)
        self.max_tokens.set(stats.limits.max_tokens)
        if stats.model is not None:
            self.base.set(stats.model.base_s)
            self.per_token.set(stats.model.per_token_s)
            self.per_vision.set(stats.model.per_vision_token_s)
            self.r2.set(stats.model.r2)
