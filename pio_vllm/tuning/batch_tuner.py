"""BatchTuner: per-step limits for the current request mix (pure code, no vLLM import).

It fits the engine's step time online, from the steps the scheduler measured (recent
window), as

    step_s = base_s + per_token_s * scheduled_tokens + per_vision_token_s * encoder_tokens

(least squares, coefficients kept non-negative), and chooses

- the step token budget T that holds the TPOT target when the step also encodes the mix's
  typical image: base + per_token*T + per_vision*v_image <= tpot_target_s;
- the number of running requests B that holds it for a pure decode step (B tokens) and
  fits the KV cache: B * kv_blocks_per_request <= kv_blocks_total * kv_high_watermark;
- the vision tokens encoded per step E that hold it next to that decode batch:
  base + per_token*B + per_vision*E <= tpot_target_s (the scheduler keeps E at least one
  whole image, so this spreads images over steps instead of stalling every running request
  for several at once);

both bounded by the static limits vLLM sized its buffers for and by floors, moved a
fraction `smoothing` of the way per decision. Without enough steps, or with a poor fit
(R^2 < min_r2), it returns the static limits and says why.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pio_vllm.settings import TuningSettings


@dataclass(frozen=True)
class StepSample:
    """One engine step as the scheduler measured it."""

    tokens: int  # tokens scheduled (prefill chunks + decodes)
    vision_tokens: int  # vision tokens encoded in the step
    requests: int
    step_s: float
    vision_tokens_sq: int = 0  # the sum of each encoded image's vision tokens squared


@dataclass(frozen=True)
class StepModel:
    """Fitted step time: base_s + per_token_s * tokens + per_vision_token_s * vision."""

    base_s: float
    per_token_s: float
    per_vision_token_s: float
    r2: float
    samples: int

    def predict_s(self, tokens: float, vision_tokens: float = 0.0) -> float:
        return self.base_s + self.per_token_s * tokens + self.per_vision_token_s * vision_tokens


class LimitSource(enum.Enum):
    STATIC_NO_DATA = "static_no_data"  # too few steps measured yet
    STATIC_POOR_FIT = "static_poor_fit"  # the model does not explain step time
    TUNED = "tuned"


@dataclass(frozen=True)
class BatchLimits:
    max_active: int  # requests running at once (vLLM's cap and pio's admission window)
    max_tokens: int  # tokens scheduled per step
    source: LimitSource = LimitSource.STATIC_NO_DATA
    # Vision tokens encoded per step (None: vLLM's own budget). The scheduler never goes
    # below the largest waiting image, so a low value means one large image per step.
    max_encoder_tokens: int | None = None


@dataclass(frozen=True)
class RequestMix:
    """The requests the limits are for (running and queued)."""

    requests: int
    mean_kv_blocks: float  # per request, prompt + expected output
    mean_image_vision_tokens: float  # per image-bearing request (0: text only)


@dataclass(frozen=True)
class TunerStats:
    limits: BatchLimits
    model: StepModel | None
    target: BatchLimits | None  # the unsmoothed choice
    decisions: int


def fit_nonnegative(columns: dict[str, np.ndarray], y: np.ndarray
                    ) -> tuple[float, dict[str, float], float]:
    """(base, slopes by column, R^2) of the least-squares fit y ~ base + sum(slope * column).

    Non-negative by elimination: a step's tokens include its image placeholders, so the work
    terms are correlated and a free fit can give one a negative slope; such a term is
    dropped (slope 0) and the rest refitted, rather than clipped (clipping breaks the fit).
    A column that is all zero is not fitted. The base is floored at 0."""
    terms = {name: column for name, column in columns.items() if column.any()}
    n = len(y)
    while True:
        x = np.stack([np.ones(n), *terms.values()], axis=1)
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        negative = [name for name, c in zip(terms, coef[1:], strict=True) if c < 0]
        if not negative:
            break
        del terms[negative[0]]
    base = max(0.0, float(coef[0]))
    slopes = {name: 0.0 for name in columns} | dict(
        zip(terms, (float(c) for c in coef[1:]), strict=True))
    pred = base + sum(slopes[name] * terms[name] for name in terms)
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return base, slopes, r2


def _floor(x: float) -> int:
    """floor() that does not lose a whole unit to float error (9.999999 -> 10)."""
    return math.floor(x + 1e-6)


class BatchTuner:
    """Chooses BatchLimits; feed it `observe(samples)`, ask `decide(mix)`."""

    def __init__(self, settings: TuningSettings, static: BatchLimits, *,
                 kv_blocks_total: int | None, kv_high_watermark: float = 0.95,
                 token_floor: int = 1) -> None:
        self._settings = settings
        self._static = BatchLimits(static.max_active, static.max_tokens,
                                   LimitSource.STATIC_NO_DATA)
        self._kv_blocks_total = kv_blocks_total
        self._kv_high_watermark = kv_high_watermark
        self._token_floor = max(1, min(token_floor, static.max_tokens))
        self._samples: collections.deque[StepSample] = collections.deque(
            maxlen=settings.window)
        self._limits = self._static
        self._active_f = float(static.max_active)  # smoothed, unrounded
        self._tokens_f = float(static.max_tokens)
        self._model: StepModel | None = None
        self._target: BatchLimits | None = None
        self._decisions = 0

    @property
    def token_floor(self) -> int:
        return self._token_floor

    @property
    def limits(self) -> BatchLimits:
        return self._limits

    def observe(self, samples: Iterable[StepSample]) -> None:
        self._samples.extend(s for s in samples if s.tokens > 0 and s.step_s > 0)

    def fit(self) -> StepModel | None:
        """Least-squares step-time model of the recent window (None: too few steps)."""
        n = len(self._samples)
        if n < self._settings.min_samples:
            return None
        base, slopes, r2 = fit_nonnegative(
            {"tokens": np.array([s.tokens for s in self._samples], dtype=float),
             "vision": np.array([s.vision_tokens for s in self._samples], dtype=float)},
            np.array([s.step_s for s in self._samples], dtype=float))
        return StepModel(base, slopes["tokens"], slopes["vision"], r2, n)

    def refit(self) -> StepModel | None:
        """Refit the step model without deciding limits (SLO admission without tuning)."""
        self._model = self.fit()
        return self._model

    def decide(self, mix: RequestMix) -> BatchLimits:
        """The limits for the next interval (smoothed towards the target)."""
        self._decisions += 1
        model = self.fit()
        self._model = model
        if model is None:
            return self._fall_back(LimitSource.STATIC_NO_DATA)
        if model.r2 < self._settings.min_r2:
            return self._fall_back(LimitSource.STATIC_POOR_FIT)
        tpot = self._settings.tpot_target_s
        static = self._static
        if model.per_token_s > 0:
            room_s = (tpot - model.base_s
                      - model.per_vision_token_s * mix.mean_image_vision_tokens)
            tokens = _floor(room_s / model.per_token_s) if room_s > 0 else 0
            active = _floor((tpot - model.base_s) / model.per_token_s) if (
                tpot > model.base_s) else 0
        else:
            # Scheduled tokens cost nothing measurable beside the images' encoder work: the
            # token budget and the decode batch are not what limits TPOT; keep them static
            # (only the KV cache bounds the batch).
            tokens, active = static.max_tokens, static.max_active
        if self._kv_blocks_total and mix.mean_kv_blocks > 0:
            fit_kv = _floor(
                self._kv_blocks_total * self._kv_high_watermark / mix.mean_kv_blocks)
            active = min(active, fit_kv)
        active = max(self._settings.min_active, min(active, static.max_active))
        tokens = max(self._token_floor, min(tokens, static.max_tokens))
        encoder: int | None = None
        if self._settings.cap_encoder and model.per_vision_token_s > 0:
            room_s = tpot - model.base_s - model.per_token_s * active
            encoder = max(1, _floor(room_s / model.per_vision_token_s)) if room_s > 0 else 1
        self._target = BatchLimits(active, tokens, LimitSource.TUNED, encoder)
        return self._move_towards(active, tokens, LimitSource.TUNED, encoder)

    def _fall_back(self, source: LimitSource) -> BatchLimits:
        self._target = BatchLimits(self._static.max_active, self._static.max_tokens, source)
        return self._move_towards(self._static.max_active, self._static.max_tokens, source)

    def _move_towards(self, active: int, tokens: int, source: LimitSource,
                      encoder: int | None = None) -> BatchLimits:
        a = self._settings.smoothing
        self._active_f += a * (active - self._active_f)
        self._tokens_f += a * (tokens - self._tokens_f)
        # Round towards the target so the limits reach it instead of stalling one short.
        new_active = math.ceil(self._active_f) if active > self._active_f else math.floor(
            self._active_f)
        new_tokens = math.ceil(self._tokens_f) if tokens > self._tokens_f else math.floor(
            self._tokens_f)
        new_active = max(self._settings.min_active, min(new_active, self._static.max_active))
        new_tokens = max(self._token_floor, min(new_tokens, self._static.max_tokens))
        self._limits = BatchLimits(new_active, new_tokens, source, encoder)
        return self._limits

    def stats(self) -> TunerStats:
        return TunerStats(self._limits, self._model, self._target, self._decisions)
