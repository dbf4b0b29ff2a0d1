"""Calibration profiles: what an engine step and a request's preparation take (pure code).

    step_s = (base_s + per_token_s * tokens + per_vision_token_s * vision_tokens
              + per_vision_token_sq_s * sum(image_tokens ** 2)) * residual

`tokens` are every token the step schedules (decodes, prefill chunks, image placeholders),
`vision_tokens` the images encoded in the step; the square term is the vision encoder's
superlinear growth with an image's size (its attention spans the image's patches).
`residual` is drawn from the fit's residual factors (actual / predicted), so the tails of a
real engine's step times survive; a profile without residuals is exact.

    prep_s = prep_base_s + prep_per_vision_token_s * vision_tokens

is what the frontend spends on a request before vLLM has it (chat template, the HF image
processor on vLLM's one multimodal thread).

Profiles are JSON files (`configs/profiles/*.json`): `pio-vllm bench calibrate` fits one from
a real engine's step records; the H100 profile is derived from measured anchors and says so
in its `source`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pio_vllm.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "profiles"


@dataclass(frozen=True)
class SimProfile:
    """Step and preparation time of one model on one device."""

    name: str
    source: str  # "fitted: ..." or "derived: ..." (not fitted)
    base_s: float
    per_token_s: float
    per_vision_token_s: float
    per_vision_token_sq_s: float = 0.0
    prep_base_s: float = 0.0
    prep_per_vision_token_s: float = 0.0
    kv_cache_gib: float | None = None  # KV cache size the engine has (None: the config's)
    residuals: tuple[float, ...] = field(default=())  # actual / predicted factors

    def predict_s(self, tokens: int, image_tokens: Sequence[int] = ()) -> float:
        return (self.base_s + self.per_token_s * tokens
                + self.per_vision_token_s * sum(image_tokens)
                + self.per_vision_token_sq_s * sum(t * t for t in image_tokens))

    def step_s(self, tokens: int, image_tokens: Sequence[int], rng: random.Random) -> float:
        predicted = self.predict_s(tokens, image_tokens)
        return predicted * rng.choice(self.residuals) if self.residuals else predicted

    def prep_s(self, vision_tokens: int) -> float:
        return self.prep_base_s + self.prep_per_vision_token_s * vision_tokens

    def to_json(self) -> str:
        data = asdict(self)
        data["residuals"] = [round(r, 4) for r in self.residuals]
        return json.dumps(data, indent=1) + "\n"


def load_profile(name_or_path: str) -> SimProfile:
    """A profile by file path, or by name from configs/profiles/."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise ConfigError(f"profile {name_or_path!r} not found; accepted: a JSON file or one "
                          f"of {known}")
    data = json.loads(path.read_text())
    try:
        data["residuals"] = tuple(float(r) for r in data.get("residuals", ()))
        return SimProfile(**data)
    except TypeError as e:
        raise ConfigError(f"profile {path}: {e}") from e


def profile_for(model: str, on_gpu: bool) -> str:
    """The default profile name of a model on a device."""
    if "tiny" in model.lower() and not on_gpu:
        return "tiny-cpu"
    return "qwen3-vl-2b-h100" if on_gpu else "qwen3-vl-2b-cpu"
