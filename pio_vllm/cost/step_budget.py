"""Step-time budget: how much new prefill and vision-encoder work one engine step may take
(pure code, no vLLM import; used inside vLLM's EngineCore by patches/step_budget.py).

An urgent request that arrives while the engine runs a step waits for that step to end; a
step that prefills several large images at once can last many times the urgent request's
own time to first token (the 2B model on a 2-core CPU ran four batch prefills as one ~19 s
step while interactive requests waited). Sarathi-Serve's answer is a token budget per step;
pio's is a time budget: while a class above the work in the engine is configured, each
step's new work is capped so that its predicted time stays within `budget_s`:

    step_s = base_s + per_token_s * tokens + per_vision_token_s * vision_tokens

where `tokens` counts every scheduled token (decodes, prefill chunks, image placeholders)
and `vision_tokens` the images encoded in the step. The decodes of the running requests
come first; what time remains is given to prefill tokens, and to images at their full
price (encoder plus their placeholders' prefill). An image whose price alone exceeds what
remains still runs, alone in its step: vLLM encodes an image whole, so a smaller budget
would starve it.

The prices come from a `StepProfile`: a default per model and device (measured or derived,
below) until the frontend's online fit of the scheduler's own step records passes its R^2
test, then the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StepProfile:
    """Engine step time per unit of work; `source` says where the numbers come from."""

    base_s: float
    per_token_s: float
    per_vision_token_s: float
    source: str

    def predict_s(self, tokens: float, vision_tokens: float = 0.0) -> float:
        return self.base_s + self.per_token_s * tokens + self.per_vision_token_s * vision_tokens


# Default profiles, before an online fit exists. `tiny-cpu`: the step model fitted in the
# mixed-resolution benchmark on a 2-core CPU (8-13 ms + 0.60-0.79 ms per vision token, text
# tokens below measurement). `qwen3-vl-2b-cpu`: fitted online from the scheduler's step
# records of the 2B-shaped model on the same CPU in the step-budget benchmark (143 steps,
# R^2 0.998: 112 ms + 17.4 ms per vision token; text tokens below measurement beside the
# images, so text prefill is not capped until a fit with text prices it).
# `qwen3-vl-2b-h100`: derived, not fitted, from the H100 anchors (../shared/gpu/README.md:
# one request with a cached image 14-28 ms, a unique 1344x1008 image 162 ms, 12.5k output
# tok/s at batch 128) until a GPU run replaces it.
PROFILES: dict[str, StepProfile] = {
    "tiny-cpu": StepProfile(0.010, 0.00002, 0.0007, "fitted: mixed-resolution, 2-core CPU"),
    "qwen3-vl-2b-cpu": StepProfile(0.112, 0.0, 0.0174,
                                   "fitted: step records of the 2B-shaped model, 2-core CPU"),
    "qwen3-vl-2b-h100": StepProfile(0.012, 0.00003, 0.00008,
                                    "derived from H100 anchors, not fitted"),
}


def profile_for(model: str, on_gpu: bool) -> StepProfile:
    """The default profile of a model on this device: the tiny preset, else the 2B shape
    (Qwen3-VL-2B and the qwen3-vl-2b preset) for CPU or GPU. A larger model starts from
    the 2B profile (conservative: steps priced longer than they run) until its fit."""
    name = model.lower()
    if "tiny" in name and not on_gpu:
        return PROFILES["tiny-cpu"]
    return PROFILES["qwen3-vl-2b-h100" if on_gpu else "qwen3-vl-2b-cpu"]


@dataclass(frozen=True)
class StepCaps:
    """The caps of one step: total scheduled tokens and vision tokens encoded."""

    max_tokens: int
    max_encoder_tokens: int
    alone: bool  # the next image does not fit the budget: it runs alone


def step_caps(profile: StepProfile, budget_s: float, decode_tokens: int,
              next_image_tokens: int, min_prefill_tokens: int = 1) -> StepCaps:
    """Caps that keep the step within `budget_s` after `decode_tokens` decodes;
    `next_image_tokens`: vision tokens of the next image waiting to be encoded (0: none);
    `min_prefill_tokens`: the smallest prefill chunk a step gets whatever the budget (a
    step must make progress: below the step's fixed cost, one token a step would take a
    prompt's length in steps).

    Prefill tokens get what time is left after the decodes; the encoder gets what is left
    at an image's full price (its encoder work plus its placeholders' prefill). Where the
    next image does not fit, the caps admit exactly that image (and the decodes)."""
    unlimited = 1 << 30
    left_s = budget_s - profile.base_s - profile.per_token_s * decode_tokens
    if profile.per_token_s > 0:
        prefill = _floor(left_s / profile.per_token_s) if left_s > 0 else 0
    else:
        prefill = unlimited  # tokens cost nothing measurable: not what limits the step
    prefill = max(prefill, min_prefill_tokens, 1)
    per_image_token = profile.per_vision_token_s + profile.per_token_s
    if per_image_token <= 0:
        encoder = unlimited
    else:
        encoder = _floor(left_s / per_image_token) if left_s > 0 else 0
    if next_image_tokens and encoder < next_image_tokens:
        return StepCaps(decode_tokens + max(next_image_tokens, prefill), next_image_tokens,
                        True)
    return StepCaps(decode_tokens + prefill, max(1, encoder), False)


def _floor(x: float) -> int:
    """floor() that does not lose a whole unit to float error (9.999999 -> 10)."""
    return max(0, math.floor(x + 1e-6))


def budget_applies(top_level: int, work_levels: list[int]) -> bool:
    """The budget holds while a class above the engine's work is configured: some request
    running or waiting has a level (priority) below the top class's. Work of the top class
    alone runs with vLLM's full budgets."""
    return bool(work_levels) and max(work_levels) > top_level
