"""The step budget's arithmetic (pio_vllm/cost/step_budget.py) and its settings."""

from __future__ import annotations

import pytest

from pio_vllm.cost.step_budget import (
    PROFILES,
    StepProfile,
    budget_applies,
    profile_for,
    step_caps,
)
from pio_vllm.errors import ConfigError
from tests.helpers import tiny_settings

PROFILE = StepProfile(0.35, 0.0045, 0.012, "test")


def test_decodes_come_first_then_prefill_and_images_share_what_is_left() -> None:
    caps = step_caps(PROFILE, 2.5, decode_tokens=0, next_image_tokens=64)
    assert (caps.max_tokens, caps.max_encoder_tokens, caps.alone) == (477, 130, False)
    busy = step_caps(PROFILE, 2.5, decode_tokens=100, next_image_tokens=64)
    assert busy.max_tokens == 100 + 377 and busy.max_encoder_tokens == 103
    # the prediction of a step at the caps stays within the budget
    assert PROFILE.predict_s(busy.max_tokens) <= 2.5 + 1e-9
    assert PROFILE.predict_s(100 + busy.max_encoder_tokens, busy.max_encoder_tokens) <= 2.5


def test_an_image_over_the_budget_is_admitted_alone() -> None:
    caps = step_caps(PROFILE, 2.5, decode_tokens=8, next_image_tokens=300)
    assert caps.alone and caps.max_encoder_tokens == 300 and caps.max_tokens >= 8 + 300


def test_a_step_always_makes_progress() -> None:
    caps = step_caps(PROFILE, 0.1, decode_tokens=50, next_image_tokens=0,
                     min_prefill_tokens=256)  # the budget is below the step's fixed cost
    assert caps.max_tokens == 50 + 256 and caps.max_encoder_tokens >= 1


def test_tokens_without_a_measurable_price_are_not_capped() -> None:
    free_text = StepProfile(0.01, 0.0, 0.0007, "test")
    caps = step_caps(free_text, 0.25, decode_tokens=8, next_image_tokens=64)
    assert caps.max_tokens > 1_000_000 and caps.max_encoder_tokens == 342


def test_the_budget_holds_only_below_the_top_class() -> None:
    assert budget_applies(0, [2, 0])
    assert not budget_applies(0, [0, 0])
    assert not budget_applies(0, [])


def test_default_profiles_by_model_and_device() -> None:
    assert profile_for("pio:tiny", on_gpu=False) is PROFILES["tiny-cpu"]
    assert profile_for("pio:qwen3-vl-2b", on_gpu=False) is PROFILES["qwen3-vl-2b-cpu"]
    assert profile_for("Qwen/Qwen3-VL-2B-Instruct", on_gpu=True) is PROFILES["qwen3-vl-2b-h100"]
    assert "not fitted" in PROFILES["qwen3-vl-2b-h100"].source


def test_the_budget_is_a_fraction_of_the_top_class_ttft_target() -> None:
    settings = tiny_settings()  # interactive: ttft_target_s 1.0
    assert settings.step_budget_s() == pytest.approx(0.25)
    tuning = settings.tuning.model_copy(update={"step_budget_s": 0.4})
    assert settings.model_copy(update={"tuning": tuning}).step_budget_s() == 0.4
    off = settings.tuning.model_copy(update={"step_budget": False})
    assert settings.model_copy(update={"tuning": off}).step_budget_s() is None


def test_an_unknown_profile_is_refused_with_the_accepted_names() -> None:
    from pio_vllm.settings import PioSettings

    with pytest.raises((ConfigError, ValueError), match="step_profile 'gpu9'.*tiny-cpu"):
        PioSettings.load(None, tuning={"step_profile": "gpu9"})
