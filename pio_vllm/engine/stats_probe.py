"""EngineStatsProbe: vLLM's per-step scheduler stats, readable without HTTP (frontend process).

vLLM's AsyncLLM output handler calls every stat logger with the SchedulerStats that the
EngineCore sends with each step's outputs (running, waiting, KV cache usage). The probe is a
StatLoggerBase (interface identical in vLLM 0.23 and 0.32) that keeps the latest numbers and
step timing for pio's admission and tuning; it never logs.

pio's loggers run before vLLM's own (vLLM 0.32 StatLoggerManager puts custom loggers first),
so the probe also adds the requests pio holds before vLLM (its queue and its rendering) to
the stats' waiting count (`add_waiting`): vLLM's `vllm:num_requests_waiting` gauge, which
routers and Gateway API / llm-d endpoint pickers read as a replica's queue, then counts
them too (otherwise it reads about 0 on a saturated replica, since pio keeps vLLM's queue
short; upstream, requests stuck in rendering are invisible there, vLLM #44688). vLLM sets
the gauge once per engine step; pio's own Prometheus logger (`prometheus_logger`, vLLM's
with a hook) lets the probe set it again whenever pio's count changes (`refresh_waiting`),
so it is current between steps and while the engine is idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass(frozen=True)
class EngineStats:
    """The latest scheduler stats seen from the EngineCore."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    steps_seen: int
    updated_at: float | None  # monotonic time of the latest report
    generation_tokens_total: int
    preempted_total: int  # vLLM's own KV-pressure preemptions
    # running requests' inter-token times (vLLM's per-request ITL, engine-core timestamps)
    inter_token_s_total: float = 0.0
    inter_tokens_total: int = 0


class EngineStatsProbe:
    """Holds the latest EngineStats; `logger_factory` plugs it into AsyncLLM."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stats = EngineStats(0, 0, 0.0, 0, None, 0, 0)
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._extra_waiting: Callable[[], int] | None = None
        self._waiting_gauges: list[Any] = []  # vllm:num_requests_waiting, per engine

    def refresh_waiting(self) -> None:
        """Set vLLM's waiting gauge to the engine's last count plus what pio holds now."""
        if self._waiting_gauges and self._extra_waiting is not None:
            value = self._stats.num_waiting + self._extra_waiting()
            for gauge in self._waiting_gauges:
                gauge.set(value)

    def snapshot(self) -> EngineStats:
        return self._stats

    def add_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Call `listener(stats)` after each update (in the event loop, keep it short)."""
        self._listeners.append(listener)

    def add_waiting(self, count: Callable[[], int]) -> None:
        """Report `count()` more waiting requests to vLLM's later stat loggers."""
        self._extra_waiting = count

    def update(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        prev = self._stats
        gen_tokens = prev.generation_tokens_total
        preempted = prev.preempted_total
        itl_s, itl_n = prev.inter_token_s_total, prev.inter_tokens_total
        if iteration_stats is not None:
            gen_tokens += int(getattr(iteration_stats, "num_generation_tokens", 0))
            preempted += int(getattr(iteration_stats, "num_preempted_reqs", 0))
            itls = getattr(iteration_stats, "inter_token_latencies_iter", ())
            itl_s += float(sum(itls))
            itl_n += len(itls)
        if scheduler_stats is None:
            self._stats = EngineStats(
                prev.num_running, prev.num_waiting, prev.kv_cache_usage, prev.steps_seen,
                prev.updated_at, gen_tokens, preempted, itl_s, itl_n,
            )
            return
        self._stats = EngineStats(
            num_running=int(scheduler_stats.num_running_reqs),
            num_waiting=int(scheduler_stats.num_waiting_reqs)
            + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)),
            kv_cache_usage=float(scheduler_stats.kv_cache_usage),
            steps_seen=prev.steps_seen + 1,
            updated_at=self._clock(),
            generation_tokens_total=gen_tokens,
            preempted_total=preempted,
            inter_token_s_total=itl_s,
            inter_tokens_total=itl_n,
        )
        for listener in self._listeners:
            listener(self._stats)
        if self._extra_waiting is not None:
            scheduler_stats.num_waiting_reqs = (int(scheduler_stats.num_waiting_reqs)
                                                + self._extra_waiting())

    def logger_factory(self) -> Callable[[Any, int], StatLoggerBase]:
        """A vLLM StatLoggerFactory whose loggers feed this probe."""
        probe = self

        class _ProbeLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                probe.update(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _ProbeLogger


def prometheus_logger(probe: EngineStatsProbe) -> type[Any]:
    """vLLM's Prometheus stat logger, whose `vllm:num_requests_waiting` gauges the probe can
    also set between steps (`refresh_waiting`). Given as a stat logger, it replaces the one
    vLLM would add (vLLM 0.23 and 0.32 `StatLoggerManager.__init__`)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class PioPrometheusLogger(PrometheusStatLogger):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            super().__init__(vllm_config, engine_indexes)
            gauges = getattr(self, "gauge_scheduler_waiting", None)
            if isinstance(gauges, dict):  # per engine index (0.32, 0.23)
                probe._waiting_gauges = list(gauges.values())

    return PioPrometheusLogger


def silent_prometheus_logger() -> type[Any]:
    """A stand-in for vLLM's default Prometheus stat logger, which does nothing.

    pio passes a stat logger (the probe), so vLLM computes stats even with
    `disable_log_stats`, and its StatLoggerManager then adds its Prometheus logger unless a
    custom one is given (vLLM 0.23 and 0.32 `StatLoggerManager.__init__`). With the user's
    `disable_log_stats: true`, pio passes this one instead: no vllm:* series, and none of
    their per-step cost on the frontend's CPU."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class SilentPrometheusLogger(PrometheusStatLogger):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return SilentPrometheusLogger
