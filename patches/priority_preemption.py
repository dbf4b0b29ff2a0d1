"""PriorityPreemptionScheduler: vLLM's Scheduler that preempts running lower-priority work for
a waiting higher-priority request.

Process: EngineCore (vLLM builds it from `scheduler_cls`, the seam meant for this).
Target: `vllm.v1.core.sched.scheduler.Scheduler` and `...async_scheduler.AsyncScheduler`
(subclasses; nothing of vLLM is modified). vLLM versions verified: 0.32.0 (CPU build, CI),
0.23.0 (the GPU machine's, CPU build here).

What it changes: at the start of each `schedule()`, while the running set is full and a
waiting request (WAITING or PREEMPTED, i.e. not blocked on a grammar or a KV transfer) has a
strictly lower priority value than some running request, the running request with the
largest (priority, arrival_time) is preempted with vLLM's own `_preempt_request`: its KV
blocks are freed (prefix-cached blocks stay reusable, so the resume recomputes little), its
encoder-cache entry is released (kept until the space is needed), and it goes back to the
waiting queue, which vLLM's priority policy keeps ordered; it resumes by recompute with its
output tokens kept. A request is never preempted more than `max_preemptions` times (vLLM's
`Request.num_preemptions`, which also counts vLLM's own KV-pressure preemptions). This is the
victim rule vLLM itself applies under KV pressure; vLLM just never applies it for a waiting
request (upstream issue #40004). Because the request stays inside vLLM, n > 1, logprobs,
structured output and penalties survive a preemption unchanged.

Settings travel in the engine config: `additional_config["pio"] = {"preemption": bool,
"max_preemptions": int}` (written by pio's VllmBackend). Without them preemption is off and
the class behaves as vLLM's Scheduler.

Why: vLLM's priority policy only orders its waiting queue; an urgent request waits for some
running request to finish (DESIGN.md: plain vLLM's high-priority TTFT p50 0.46 s behind
256-token outputs, and README priority-inversion). pio's earlier frontend preemption
(abort + re-render + resume) cost a round trip and a re-prefill per preemption, and could
not serve n > 1 or logprobs requests.

How to remove: run with `admission.preemption: false` and `tuning.enabled: false`; pio then
leaves `scheduler_cls` to vLLM and vLLM's own scheduler runs.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

# The key of pio's settings in `VllmConfig.additional_config`.
CONFIG_KEY = "pio"
_READY = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class PriorityPreemptionMixin:
    """Preempts for waiting higher-priority requests; mix in before a vLLM Scheduler."""

    # Attributes of vLLM's Scheduler this mixin reads (0.23 and 0.32).
    vllm_config: Any
    policy: Any
    running: list[Any]
    waiting: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pio = dict((self.vllm_config.additional_config or {}).get(CONFIG_KEY) or {})
        self.pio_preemption = bool(pio.get("preemption", False)) and (
            self.policy == SchedulingPolicy.PRIORITY)
        self.pio_max_preemptions = int(pio.get("max_preemptions", 2))
        self.pio_preemptions_total = 0
        # 0.32 separates admission into RUNNING (max_num_active_reqs) from the model
        # runner's slots; 0.23 has only max_num_running_reqs.
        self._pio_cap_attr = ("max_num_active_reqs" if hasattr(self, "max_num_active_reqs")
                              else "max_num_running_reqs")

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if self.pio_preemption and self.running and self.waiting:
            self._pio_preempt_for_waiting()
        return super().schedule(*args, **kwargs)  # type: ignore[misc]

    def _pio_free_slots(self) -> int:
        cap = int(getattr(self, self._pio_cap_attr))
        busy = len(self.running) + int(getattr(self, "num_waiting_for_streaming_input", 0))
        return cap - busy

    def _pio_preempt_for_waiting(self) -> None:
        free = self._pio_free_slots()
        now = time.monotonic()
        for waiter in self.waiting:  # in (priority, arrival) order
            if waiter.status not in _READY:
                continue
            if free > 0:  # it gets a free slot without preempting anyone
                free -= 1
                continue
            victim = self._pio_victim(waiter.priority)
            if victim is None:
                return  # later waiters have the same or a lower priority
            self.running.remove(victim)
            self._pio_preempt(victim, now)
            self.pio_preemptions_total += 1

    def _pio_victim(self, priority: int) -> Any | None:
        can_free = getattr(self, "_request_blocks_can_be_freed", None)
        candidates = [
            r for r in self.running
            if r.priority > priority and r.num_preemptions < self.pio_max_preemptions
            and (can_free is None or can_free(r))
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))

    def _pio_preempt(self, request: Any, now: float) -> None:
        preempt = self._preempt_request  # type: ignore[attr-defined]
        if hasattr(self, "requires_kv_delivery"):  # 0.32: as its KV-pressure preemption
            preempt(request, now, drop_stale_output=self.requires_kv_delivery)
        else:  # 0.23
            preempt(request, now)


class PriorityPreemptionScheduler(PriorityPreemptionMixin, Scheduler):
    """vLLM's synchronous Scheduler plus priority preemption (CPU, and GPU without async
    scheduling)."""


class PriorityPreemptionAsyncScheduler(PriorityPreemptionMixin, AsyncScheduler):
    """vLLM's AsyncScheduler plus priority preemption (GPU with async scheduling)."""
