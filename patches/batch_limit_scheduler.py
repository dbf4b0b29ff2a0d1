"""BatchLimitScheduler: vLLM's Scheduler with per-step limits settable at runtime.

Process: EngineCore (vLLM builds it from `scheduler_cls`, the seam meant for this).
Target: `vllm.v1.core.sched.scheduler.Scheduler` and `...async_scheduler.AsyncScheduler`
(subclasses; nothing of vLLM is modified), on top of priority_preemption.py's mixin, so one
`scheduler_cls` carries both. vLLM versions verified: 0.32.0 (CPU build, CI), 0.23.0 (the GPU
machine's, CPU build here).

What it changes: before each `schedule()`, the cap on requests admitted into RUNNING
(0.32: `max_num_active_reqs`; 0.23: `max_num_running_reqs`), the step token budget
(`max_num_scheduled_tokens`) and the step's vision-encoder budget
(`max_num_encoder_input_tokens`) are set to the limits pio's BatchTuner chose, never above
the values vLLM sized its buffers for at start. The encoder budget never drops below the
largest image waiting to be encoded (vLLM encodes an image whole; a smaller budget would
starve it), so a low budget means "one large image per step", not "no image". Running
requests are never preempted by a lowered cap; it only stops new admissions. After each
step it records (scheduled tokens, encoder tokens, requests, step seconds, the sum of each
encoded image's tokens squared) for the tuner and for `pio-vllm bench calibrate`.

Why: vLLM's limits are static; a step with a large image's prefill and a step of short
decodes need very different limits to hold a per-token latency target (DESIGN.md; issue 4
measurements in benchmarks/results/mixed-resolution-cpu.md).

How to remove: `tuning.enabled: false`; pio then selects priority_preemption.py's scheduler
(or none) and vLLM runs with its static limits.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from pio_vllm_patches.priority_preemption import PriorityPreemptionMixin
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

# Most step samples kept between two reads by the frontend.
MAX_SAMPLES = 512


class BatchLimitMixin:
    """`set_batch_limits` / step samples (read by a utility call); mix in before
    PriorityPreemptionMixin and a vLLM Scheduler."""

    # Attributes of vLLM's Scheduler this mixin reads and sets (0.23 and 0.32).
    running: list[Any]
    waiting: Any
    requests: dict[str, Any]
    max_num_scheduled_tokens: int
    max_num_encoder_input_tokens: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # 0.32 separates admission into RUNNING from the model-runner slot count; 0.23 has
        # one attribute and tests it with `==`, so a cap below len(running) must not be set.
        self._pio_cap_attr = (
            "max_num_active_reqs" if hasattr(self, "max_num_active_reqs")
            else "max_num_running_reqs")
        self.pio_start_active = int(getattr(self, self._pio_cap_attr))
        self.pio_start_tokens = int(self.max_num_scheduled_tokens)
        self.pio_max_active = self.pio_start_active
        self.pio_max_tokens = self.pio_start_tokens
        self.pio_start_encoder = int(getattr(self, "max_num_encoder_input_tokens", 0))
        self.pio_max_encoder = self.pio_start_encoder
        self.pio_token_floor = self.pio_start_tokens
        self.pio_peak_running = 0
        self.pio_samples: collections.deque[tuple[int, int, int, float, int]] = (
            collections.deque(maxlen=MAX_SAMPLES))
        self._pio_step_started: float | None = None
        self._pio_step_shape: tuple[int, int, int, int] = (0, 0, 0, 0)

    def set_batch_limits(self, max_active: int | None, max_tokens: int | None,
                         token_floor: int | None = None,
                         max_encoder_tokens: int | None = None) -> dict[str, int]:
        """Clamp and store the limits; they apply from the next step. Returns them."""
        if max_encoder_tokens is not None and self.pio_start_encoder:
            self.pio_max_encoder = max(1, min(int(max_encoder_tokens), self.pio_start_encoder))
        if token_floor is not None:
            self.pio_token_floor = max(1, min(int(token_floor), self.pio_start_tokens))
        if max_active is not None:
            self.pio_max_active = max(1, min(int(max_active), self.pio_start_active))
        if max_tokens is not None:
            self.pio_max_tokens = max(self.pio_token_floor,
                                      min(int(max_tokens), self.pio_start_tokens))
        return self.batch_limits()

    def batch_limits(self) -> dict[str, int]:
        return {"max_active": self.pio_max_active, "max_tokens": self.pio_max_tokens,
                "max_encoder_tokens": self.pio_max_encoder,
                "start_active": self.pio_start_active, "start_tokens": self.pio_start_tokens,
                "start_encoder_tokens": self.pio_start_encoder,
                "peak_running": self.pio_peak_running}

    def take_samples(self) -> list[tuple[int, int, int, float, int]]:
        samples = list(self.pio_samples)
        self.pio_samples.clear()
        return samples

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        cap = self.pio_max_active
        if self._pio_cap_attr == "max_num_running_reqs":
            cap = max(cap, len(self.running))
        setattr(self, self._pio_cap_attr, cap)
        self.max_num_scheduled_tokens = self.pio_max_tokens
        if self.pio_start_encoder and self.pio_max_encoder < self.pio_start_encoder:
            self.max_num_encoder_input_tokens = min(
                self.pio_start_encoder, max(self.pio_max_encoder, self._largest_waiting_item()))
        elif self.pio_start_encoder:
            self.max_num_encoder_input_tokens = self.pio_start_encoder
        output = super().schedule(*args, **kwargs)  # type: ignore[misc]
        self.pio_peak_running = max(self.pio_peak_running, len(self.running))
        encoder_tokens = encoder_sq = 0
        for req_id, inputs in (output.scheduled_encoder_inputs or {}).items():
            request = self.requests.get(req_id)
            if request is not None:
                sizes = [int(request.get_num_encoder_embeds(i)) for i in inputs]
                encoder_tokens += sum(sizes)
                encoder_sq += sum(n * n for n in sizes)
        self._pio_step_shape = (int(output.total_num_scheduled_tokens), encoder_tokens,
                                len(output.num_scheduled_tokens), encoder_sq)
        self._pio_step_started = time.perf_counter()
        return output

    def _largest_waiting_item(self) -> int:
        """Vision tokens of the largest image a waiting or running request still needs."""
        largest = 0
        for queue in (self.waiting, self.running):
            for request in queue:
                for i in range(len(request.mm_features or ())):
                    largest = max(largest, int(request.get_num_encoder_embeds(i)))
        return largest

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        started, self._pio_step_started = self._pio_step_started, None
        if started is not None and self._pio_step_shape[0] > 0:
            tokens, encoder_tokens, reqs, encoder_sq = self._pio_step_shape
            self.pio_samples.append(
                (tokens, encoder_tokens, reqs, time.perf_counter() - started, encoder_sq))
        return super().update_from_output(*args, **kwargs)  # type: ignore[misc]


class BatchLimitScheduler(BatchLimitMixin, PriorityPreemptionMixin, Scheduler):
    """vLLM's synchronous Scheduler plus runtime batch limits and priority preemption."""


class BatchLimitAsyncScheduler(BatchLimitMixin, PriorityPreemptionMixin, AsyncScheduler):
    """vLLM's AsyncScheduler plus runtime batch limits and priority preemption."""
