"""StepBudgetMixin: vLLM's Scheduler with a per-step time budget for new work while a
higher class may arrive, and lower-class prefill deferred for a waiting higher-priority
request.

Process: EngineCore (vLLM builds it from `scheduler_cls`, the seam meant for this).
Target: `vllm.v1.core.sched.scheduler.Scheduler` and `...async_scheduler.AsyncScheduler`
(a mixin of pio's scheduler classes, priority_preemption.py and batch_limit_scheduler.py;
nothing of vLLM is modified). vLLM versions verified: 0.32.0 (CPU build, CI), 0.23.0 (the
GPU machine's, CPU build here).

What it changes, before each `schedule()`, while some running or waiting request belongs
to a class below the top configured one (pio_vllm/cost/step_budget.py):
1. Step budget: the step token budget (`max_num_scheduled_tokens`) and the vision-encoder
   budget (`max_num_encoder_input_tokens`) are lowered so that the step's predicted time
   (decodes first, then prefill and images at their full price) stays within
   `budget_s`; an image too large for the budget runs alone in its step. Never above the
   values vLLM sized its buffers for; restored after the step.
2. Deferral: when a request waits (WAITING or PREEMPTED) with a higher priority than a
   running request whose prefill is not finished, that running request sits this step out
   (it is taken out of `running` for the call and put back after, with its KV blocks and
   computed tokens; the running cap is lowered by as many, so no extra request enters), so
   the step's budget goes to the urgent request's prefill instead of the lower class's
   next chunk or image.
The prices come from `additional_config["pio"]["step_budget"]["profile"]` (the model's
default profile) until the frontend sends its fitted step model (`set_step_model`, through
the `pio_batch_limits` utility call).

Why: on the 2B-shaped model on a 2-core CPU, four batch image prefills ran as one ~19 s step
(max_num_batched_tokens 8192 took them all) while interactive requests that arrived 0.5 s
in waited for it, and then for the batch requests' next chunks; interactive TTFT p50 was
23.4 s against 2.6 s alone (README, step budget). vLLM's budgets are static, sized for
throughput.

How to remove: `tuning.step_budget: false` (no budget settings reach the EngineCore and the
mixin passes every call through), or drop the mixin from the scheduler classes.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.request import RequestStatus

from pio_vllm.cost.step_budget import StepProfile, budget_applies, step_caps

CONFIG_KEY = "pio"
_READY = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class StepBudgetMixin:
    """Caps each step's new work while a higher class may arrive; mix in after the
    preemption mixin and before a vLLM Scheduler."""

    # Attributes of vLLM's Scheduler this mixin reads and sets (0.23 and 0.32).
    vllm_config: Any
    running: list[Any]
    waiting: Any
    max_num_scheduled_tokens: int
    max_num_encoder_input_tokens: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pio = dict((self.vllm_config.additional_config or {}).get(CONFIG_KEY) or {})
        cfg = pio.get("step_budget") or None
        self.pio_step_budget_s: float | None = None
        self.pio_top_level = 0
        self.pio_min_prefill_tokens = 1
        self.pio_step_profile: StepProfile | None = None
        if cfg:
            self.pio_step_budget_s = float(cfg["budget_s"])
            self.pio_top_level = int(cfg["top_level"])
            self.pio_min_prefill_tokens = int(cfg.get("min_prefill_tokens", 1))
            base, per_token, per_vision = (float(x) for x in cfg["profile"])
            self.pio_step_profile = StepProfile(base, per_token, per_vision,
                                                str(cfg.get("source", "default")))
        self.pio_budget_steps = 0  # steps whose budgets the time budget lowered
        self.pio_alone_steps = 0  # steps that ran one image over the budget alone
        self.pio_deferred = 0  # lower-class prefills that sat a step out
        self._pio_budget_cap_attr = (
            "max_num_active_reqs" if hasattr(self, "max_num_active_reqs")
            else "max_num_running_reqs")

    def set_step_model(self, base_s: float, per_token_s: float, per_vision_token_s: float,
                       source: str = "online fit") -> None:
        """Price steps with the frontend's fitted model from the next step on."""
        if self.pio_step_budget_s is not None:
            self.pio_step_profile = StepProfile(base_s, per_token_s, per_vision_token_s,
                                                source)

    def step_budget_stats(self) -> dict[str, Any]:
        profile = self.pio_step_profile
        return {"budget_s": self.pio_step_budget_s, "budget_steps": self.pio_budget_steps,
                "alone_steps": self.pio_alone_steps, "deferred": self.pio_deferred,
                "profile": None if profile is None else [
                    profile.base_s, profile.per_token_s, profile.per_vision_token_s,
                    profile.source]}

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        profile, budget_s = self.pio_step_profile, self.pio_step_budget_s
        if profile is None or budget_s is None or not budget_applies(
                self.pio_top_level, [r.priority for r in self.running]
                + [r.priority for r in self.waiting]):
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        hidden = self._pio_defer_lower_prefills()
        tokens, encoder = self.max_num_scheduled_tokens, self.max_num_encoder_input_tokens
        cap = int(getattr(self, self._pio_budget_cap_attr))
        decodes = sum(1 for r in self.running if not _prefill_pending(r))
        next_image = self._pio_next_image_tokens()
        caps = step_caps(profile, budget_s, decodes, next_image, self.pio_min_prefill_tokens)
        self.max_num_scheduled_tokens = max(1, min(tokens, caps.max_tokens))
        if encoder:
            self.max_num_encoder_input_tokens = max(1, min(encoder, caps.max_encoder_tokens))
        if self.max_num_scheduled_tokens < tokens or self.max_num_encoder_input_tokens < encoder:
            self.pio_budget_steps += 1
        self.pio_alone_steps += caps.alone
        setattr(self, self._pio_budget_cap_attr, max(0, cap - len(hidden)))
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.max_num_scheduled_tokens, self.max_num_encoder_input_tokens = tokens, encoder
            setattr(self, self._pio_budget_cap_attr, cap)
            self.running.extend(hidden)

    def _pio_defer_lower_prefills(self) -> list[Any]:
        """Take out of `running`, for this step, the requests still prefilling whose
        priority is below that of a request ready in `waiting`."""
        ready = [w.priority for w in self.waiting if w.status in _READY]
        if not ready:
            return []
        best = min(ready)
        hidden = [r for r in self.running if r.priority > best and _prefill_pending(r)]
        if hidden:
            ids = {id(r) for r in hidden}
            self.running[:] = [r for r in self.running if id(r) not in ids]
            self.pio_deferred += len(hidden)
        return hidden

    def _pio_next_image_tokens(self) -> int:
        """Vision tokens of the first image not yet computed, in scheduling order (running,
        then waiting by priority): the one the next step would encode."""
        for queue in (self.running, self.waiting):
            for request in queue:
                for i, feature in enumerate(request.mm_features or ()):
                    position = feature.mm_position
                    if position.offset + position.length > request.num_computed_tokens:
                        return int(request.get_num_encoder_embeds(i))
        return 0


def _prefill_pending(request: Any) -> bool:
    """More than one token to compute: a prompt (or a preempted request's recompute) not
    finished; a decode computes exactly one."""
    return int(request.num_tokens) - int(request.num_computed_tokens) > 1
