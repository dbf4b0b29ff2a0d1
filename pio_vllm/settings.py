"""PioSettings: the one settings object (built at the edge, in the frontend process).

Sources, highest precedence first: explicit keyword overrides, `PIO_*` environment variables
(nested with `__`, e.g. `PIO_IMAGES__MAX_IMAGE_PIXELS=1000000`,
`PIO_ENGINE__MAX_NUM_SEQS=4`), the YAML config file, the defaults below. The config file is
the `config_path` argument of `PioSettings.load`, else `$PIO_CONFIG`, else none.

`engine` holds vLLM's own engine arguments (the fields of `vllm.AsyncEngineArgs`, the same
names as `vllm serve` flags with `_` for `-`), passed to vLLM verbatim; pio never re-declares
them. This module is the only one that reads the environment.

Size: one settings object, every field with its description and validator (the
settings reference is generated from them), so the whole tree lives here (~680 lines).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from pio_vllm.errors import ConfigError

# The model spec that names a locally built checkpoint: "pio:tiny", "pio:qwen3-vl-2b".
LOCAL_MODEL_PREFIX = "pio:"

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("pio_config_file", default=None)


class PriorityClass(BaseModel):
    """One priority class. `level` follows vLLM: a lower number is served first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: int = Field(description="vLLM priority level; lower is served first.")
    max_queue_len: int = Field(
        default=256, gt=0, description="Most requests of this class waiting in pio at once."
    )
    max_queue_wait_s: float | None = Field(
        default=None,
        gt=0,
        description="Default deadline for waiting in pio's queue (None: wait until served).",
    )
    weight: float = Field(
        default=1.0, gt=0, description="Share of admissions when classes compete under aging."
    )
    ttft_target_s: float | None = Field(
        default=None, gt=0,
        description="SLO: time to first token this class's requests must meet (None: no "
        "SLO). With admission.slo_admission, a request predicted to miss it is not admitted "
        "to miss: it is refused at once (429 + Retry-After) or served late, as the class's "
        "`infeasible` says.",
    )
    tpot_target_s: float | None = Field(
        default=None, gt=0,
        description="SLO: mean time per output token after the first (None: no SLO). With "
        "admission.slo_admission, new work enters the engine only as fast as running "
        "requests keep this.",
    )
    infeasible: Literal["shed", "serve_late"] = Field(
        default="shed",
        description="What SLO admission does with a request predicted to miss ttft_target_s: "
        "shed (refuse it at once: 429 + Retry-After, a typed error in-process) or serve_late "
        "(keep it, without its SLO, behind all work that can still meet one, in pio's queue "
        "and in vLLM's; for batch work that must be served even when late).",
    )


def _default_classes() -> dict[str, PriorityClass]:
    return {
        "interactive": PriorityClass(level=0, max_queue_len=64, weight=4.0),
        "standard": PriorityClass(level=1, max_queue_len=256, weight=2.0),
        "batch": PriorityClass(level=2, max_queue_len=1024, weight=1.0),
    }


class ImageSettings(BaseModel):
    """Limits and workers of image intake (decode, fetch, cache)."""

    model_config = ConfigDict(extra="forbid")

    max_images_per_request: int | None = Field(
        default=None,
        ge=0,
        description="Most images per request; None uses the engine's limit_mm_per_prompt.image.",
    )
    max_image_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="Largest encoded image accepted, in bytes."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Largest width*height accepted; checked from the header before decoding, "
        "so decompression bombs are refused without allocating their pixels.",
    )
    resize_max_pixels: int | None = Field(
        default=None,
        gt=0,
        description="Downscale (aspect kept) images above this many pixels before vLLM sees "
        "them; None leaves sizing to the model's processor (its own max_pixels).",
    )
    decode_workers: int = Field(
        default=2, gt=0, description="Threads decoding and resizing images, off the event loop."
    )
    decode_off_loop: bool = Field(
        default=True,
        description="Decode, hash and resize images in the thread pool. False does it in-line "
        "on the event loop (the plugin's enable_async_multimodal_processing=False): simpler, "
        "and slower when requests overlap, since the loop waits for each image.",
    )
    decode_max_pending: int = Field(
        default=256, gt=0, description="Most image jobs waiting for a decode thread; more is shed."
    )
    cache_max_entries: int = Field(
        default=256, ge=0, description="Decoded images kept by content hash (0 disables)."
    )
    cache_max_mb: float = Field(
        default=512.0, ge=0, description="Bound on decoded pixel bytes held by the cache, MiB."
    )
    fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Total time allowed for one http(s) image fetch."
    )
    allow_local_files: bool = Field(
        default=True, description="Accept file paths as image sources (the server turns it off)."
    )
    allowed_local_dirs: list[Path] | None = Field(
        default=None, description="If set, local image paths must lie under one of these dirs."
    )
    allowed_url_domains: list[str] | None = Field(
        default=None,
        description="If set, http(s) images may only come from these hosts (or subdomains).",
    )
    allowed_private_networks: list[str] = Field(
        default_factory=list,
        description="Non-public networks image fetches may connect to, as 'CIDR' or "
        "'CIDR:PORT' ('10.0.0.0/8', '127.0.0.1/32:8080', '[fd00::]/8:9000'). Empty (the "
        "default): only public addresses; loopback, private, link-local, unique-local, "
        "multicast, unspecified and reserved ones are refused in every spelling.",
    )

    @field_validator("allowed_private_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from pio_vllm.netspec import parse_exception

        for spec in value:
            parse_exception(spec)  # ValueError names the spec and the accepted forms
        return value


class AdmissionSettings(BaseModel):
    """pio's priority admission in front of all per-request work (queues, aging, shedding) and
    priority preemption inside vLLM's scheduler."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Queue requests in pio, before any rendering or image work, and admit "
        "them by priority; off sends every request straight to vLLM (its own priority queue "
        "still applies).",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Most sequences past pio's queue at once (being prepared, or in vLLM "
        "running or waiting), counted per level: lower-priority requests never hold a "
        "higher-priority one back. None: engine max_num_seqs + lookahead.",
    )
    lookahead: int = Field(
        default=2,
        ge=0,
        description="Prepared requests admitted beyond max_num_seqs; they wait in vLLM's "
        "priority-ordered queue so a finished request's slot is refilled inside the engine, "
        "not after a frontend round trip.",
    )
    max_preparing: int = Field(
        default=2,
        ge=1,
        description="Most requests being prepared at once (chat template, image fetch and "
        "decode, vLLM's image processor), counted per level like max_in_flight: a flood's "
        "images are processed a few at a time and an urgent request is never behind more. "
        "In the OpenAI server the top class is bounded by capacity only (nothing outranks "
        "it, and vLLM renders one request at a time anyway).",
    )
    kv_high_watermark: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Stop admitting while vLLM's KV cache usage is at or above this fraction "
        "(a request that outranks one in vLLM still goes in).",
    )
    aging_s_per_level: float = Field(
        default=10.0,
        gt=0,
        description="Seconds of waiting (at class weight 1) that improve a queued request's "
        "effective priority by one level, so lower classes never starve in pio's queue.",
    )
    preemption: bool = Field(
        default=True,
        description="Inside vLLM's scheduler (pio's scheduler_cls, patches/), preempt the "
        "lowest-priority running request when a strictly higher-priority one waits and the "
        "running set is full; it resumes by recompute with its tokens kept. Needs "
        "engine.scheduling_policy: priority.",
    )
    max_preemptions: int = Field(
        default=2, ge=0, description="Most times one request may be preempted."
    )
    rate_window: int = Field(
        default=64,
        ge=2,
        description="Recent completions used to measure the service rate for deadline checks.",
    )
    slo_admission: bool = Field(
        default=True,
        description="Price each request in engine seconds from the step-time model fitted on "
        "the scheduler's own step records (vision tokens -> encoder time, prompt tokens -> "
        "prefill time) and refuse at once (or serve late) what would miss its TTFT target, "
        "its class's ttft_target_s or its own x-llm-d-slo-ttft-ms; where a class has "
        "ttft_target_s / tpot_target_s, also let work into vLLM only as fast as running "
        "requests keep their TPOT target.",
    )
    slo_safety: float = Field(
        default=0.8, gt=0, le=1,
        description="Fraction of the TPOT target the admitted work may use (headroom for "
        "what the step model misses).",
    )
    work_burst_s: float = Field(
        default=1.0, gt=0,
        description="Engine seconds of prefill work that may enter at once (the work "
        "bucket's size); a single larger request enters when the bucket is full.",
    )
    unknown_image_vision_tokens: int = Field(
        default=1024, ge=1,
        description="Vision tokens assumed for an image whose size is not known before "
        "admission (an http(s) URL or a file pio fetches only once admitted).",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return refuse_removed("admission", data)


class TuningSettings(BaseModel):
    """Complexity-based batch tuning: per-step limits from a fitted step-time model."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Run vLLM with pio's BatchLimitScheduler (patches/) and retune the number "
        "of running requests and the step token budget from engine measurements.",
    )
    tpot_target_s: float = Field(
        default=0.05, gt=0, description="Per-output-token latency (engine step time) to hold."
    )
    interval_s: float = Field(
        default=0.5, gt=0, description="How often limits are refitted and sent to the engine."
    )
    window: int = Field(
        default=256, ge=8, description="Recent engine steps the step-time model is fitted on."
    )
    min_samples: int = Field(
        default=32, ge=4, description="Steps needed before the fit is used (static before)."
    )
    min_r2: float = Field(
        default=0.5, ge=0, le=1,
        description="Fit quality (R^2) below which the static limits are used; SLO "
        "admission keeps pricing with the last fit that passed.",
    )
    smoothing: float = Field(
        default=0.3, gt=0, le=1,
        description="Fraction of the way to a new target moved per decision (EMA).",
    )
    min_active: int = Field(default=1, ge=1, description="Lower bound on running requests.")
    cap_encoder: bool = Field(
        default=False,
        description="Also cap the vision tokens encoded per step (at least one whole image): "
        "shortens the worst inter-token gap but not mean TPOT, which it made worse in the "
        "mixed-resolution benchmark (README), so it is off by default.",
    )
    min_step_tokens: int = Field(
        default=256, ge=1,
        description="Lower bound on the step token budget (vLLM chunks longer prefills; "
        "images are encoded within vLLM's separate encoder budget).",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return refuse_removed("tuning", data)


# Settings of mechanisms the ablation showed gained nothing, removed: a config that still
# sets one gets an error that says so (docs/simulator.md, "Ablation").
REMOVED: dict[str, dict[str, str]] = {
    "tuning": dict.fromkeys(
        ("step_budget", "step_budget_s", "step_budget_fraction", "step_profile"),
        "the step budget (docs/batch-tuning.md)"),
    "admission": {"cheap_first_factor": "cheap-first ordering (docs/slo-admission.md)"},
}


def refuse_removed(section: str, data: Any) -> Any:
    """`data` unchanged, or a ValueError naming the removed settings it sets."""
    if isinstance(data, dict):
        gone = sorted(k for k in data if k in REMOVED[section])
        if gone:
            raise ValueError(
                f"{section}.{gone[0]} was removed with {REMOVED[section][gone[0]]}: the "
                "ablation showed it gained nothing; delete "
                f"{', '.join(f'{section}.{k}' for k in gone)} from the config")
    return data


class ApiKey(BaseModel):
    """One client key of the OpenAI server: who it is and which class it gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: SecretStr = Field(description="The bearer token (`Authorization: Bearer KEY`).")
    tenant: str = Field(description="Who holds the key; shows in logs and metrics labels.")
    priority_class: str | None = Field(
        default=None,
        description="Class of this key's requests when the request names none (None: the "
        "default class); the key may name lower-priority classes, not higher ones (403).",
    )


class ServerSettings(BaseModel):
    """`pio-vllm serve`: pio's part of the OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] | None = Field(
        default=None,
        description="If set, every route but /health, /metrics and /version needs one of "
        "these keys (else 401, and the request never reaches the engine).",
    )
    priority_ceiling: str | None = Field(
        default=None,
        description="Highest class a request may take unless its API key names a class: "
        "applies to keys without a priority_class and to every request when no keys are "
        "configured (a higher class is a 403). None: default_priority_class, so such "
        "requests can only lower their priority.",
    )
    priority_header: str = Field(
        default="X-Priority", description="Header naming a request's class or level."
    )
    objectives: dict[str, str] = Field(
        default_factory=dict,
        description="llm-d / Gateway API Inference Extension objective name -> pio class: "
        "a request's `x-llm-d-inference-objective` (else the legacy "
        "`x-gateway-inference-objective`) header names its class through this map, ahead of "
        "X-Priority (an objective not in the map is a 400 naming the configured ones; the "
        "key's class and priority_ceiling still bound it). InferenceObjective priorities "
        "are higher-is-more-critical; pio levels are lower-is-first: map by name, not by "
        "number.",
    )
    timeout_header: str = Field(
        default="X-Request-Timeout-S",
        description="Header with a request's deadline in seconds from arrival (504 after).",
    )
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Largest request body accepted (413)."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0,
        description="Time a client has to send its whole request body (408 after).",
    )
    max_json_depth: int = Field(
        default=64, ge=4, description="Deepest JSON nesting accepted in a body (400 beyond)."
    )
    max_sequences_per_request: int = Field(
        default=8, ge=1,
        description="Largest n / best_of (sequences one request runs in vLLM; each takes an "
        "admission slot); more is a 400.",
    )
    extra_routes: list[str] = Field(
        default_factory=list,
        description="vLLM routes pio turns off by default to serve anyway (exact paths, e.g. "
        "'/tokenize'): they get the API-key check, body limits and the media policy, but no "
        "admission. Generation routes are always gated; everything else is off.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: time running requests get to finish before they are aborted.",
    )


class PioSettings(BaseSettings):
    """All pio-vllm settings. Build with `PioSettings.load(...)`; pass the object down."""

    model_config = SettingsConfigDict(
        env_prefix="PIO_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    engine: dict[str, Any] = Field(
        default_factory=lambda: {"model": "pio:tiny"},
        description="vLLM engine arguments (AsyncEngineArgs fields), passed through verbatim. "
        "model 'pio:PRESET' names a checkpoint that pio builds locally.",
    )
    vllm_env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables set for vLLM before the engine starts, e.g. "
        "VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU).",
    )
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "pio-vllm" / "models",
        description="Where 'pio:PRESET' checkpoints are built once and reused.",
    )
    model_seed: int = Field(default=0, description="Seed of locally built checkpoints.")
    priority_classes: dict[str, PriorityClass] = Field(
        default_factory=_default_classes,
        description="Priority classes by name; a request names a class or gives a level.",
    )
    default_priority_class: str = Field(
        default="standard", description="Class of requests that give no priority."
    )
    sampling_defaults: dict[str, Any] = Field(
        default_factory=lambda: {"max_tokens": 64},
        description="vLLM SamplingParams fields applied where a request does not set them.",
    )
    images: ImageSettings = Field(default_factory=ImageSettings, description="Image intake.")
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings, description="Priority admission control."
    )
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, description="Time allowed for vLLM's engine processes to stop."
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings, description="The OpenAI-compatible server."
    )
    tuning: TuningSettings = Field(
        default_factory=TuningSettings, description="Complexity-based batch tuning."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @field_validator("engine")
    @classmethod
    def _engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Environment values arrive as strings ("4", "true", "[1, 2]"): decode JSON scalars
        # and lists so vLLM receives typed values; anything else stays a string.
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", key):
                raise ValueError(
                    f"engine argument {key!r} is not a vLLM AsyncEngineArgs field name "
                    "(use snake_case, e.g. max_num_seqs for --max-num-seqs)"
                )
            if isinstance(item, str):
                with suppress(ValueError):
                    item = json.loads(item)
            out[key] = item
        if "model" not in out or not out["model"]:
            raise ValueError("engine.model is required: a path, a hub id or 'pio:tiny'")
        return out

    @model_validator(mode="after")
    def _default_class_exists(self) -> PioSettings:
        if not self.priority_classes:
            raise ValueError("priority_classes is empty; define at least one class")
        if self.default_priority_class not in self.priority_classes:
            raise ValueError(
                f"default_priority_class {self.default_priority_class!r} is not one of the "
                f"priority_classes {sorted(self.priority_classes)}"
            )
        for objective, cls in self.server.objectives.items():
            if cls not in self.priority_classes:
                raise ValueError(
                    f"server.objectives[{objective!r}] names class {cls!r}; accepted: "
                    f"{sorted(self.priority_classes)}")
        ceiling = self.server.priority_ceiling
        if ceiling is not None and ceiling not in self.priority_classes:
            raise ValueError(
                f"server.priority_ceiling {ceiling!r} is not one of the priority_classes "
                f"{sorted(self.priority_classes)}")
        for i, api_key in enumerate(self.server.api_keys or []):
            if api_key.priority_class is not None and (
                    api_key.priority_class not in self.priority_classes):
                raise ValueError(
                    f"server.api_keys[{i}] (tenant {api_key.tenant!r}) names priority_class "
                    f"{api_key.priority_class!r}; accepted: {sorted(self.priority_classes)}"
                )
        return self

    @classmethod
    def load(cls, config_path: str | Path | None = None, **overrides: Any) -> PioSettings:
        """Build settings from a YAML file, `PIO_*` variables and keyword overrides.

        Raises ConfigError naming the file and each invalid field.
        """
        if config_path is None:
            config_path = cls.env_config_path()
        path = Path(config_path) if config_path is not None else None
        if path is not None and not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            with _config_file(path):
                return cls(**overrides)
        except ConfigError:
            raise
        except Exception as e:  # pydantic ValidationError, YAML errors
            where = f" (config {path})" if path else ""
            raise ConfigError(f"invalid pio settings{where}: {e}") from e

    @staticmethod
    def env_config_path() -> str | None:
        """The settings file named by `$PIO_CONFIG`, if set."""
        return os.environ.get("PIO_CONFIG") or None

    # Helpers the engine uses; they read settings only.

    @property
    def model(self) -> str:
        """The engine's model spec as configured (may be 'pio:PRESET')."""
        return str(self.engine["model"])

    def local_model_preset(self) -> str | None:
        """The preset name when the model is 'pio:PRESET', else None."""
        if self.model.startswith(LOCAL_MODEL_PREFIX):
            return self.model[len(LOCAL_MODEL_PREFIX):]
        return None

    def slo_admission_on(self) -> bool:
        """SLO admission runs (admission and slo_admission are on): the step model is fitted
        and a request with a TTFT target, its class's or its own SLO header's, is priced;
        the work is paced only where a class has a target (SloPricing.paced)."""
        return self.admission.enabled and self.admission.slo_admission

    def local_model_dir(self) -> Path:
        """Cache directory of the 'pio:PRESET' checkpoint for this seed."""
        preset = self.local_model_preset()
        if preset is None:
            raise ConfigError(f"model {self.model!r} is not a 'pio:PRESET' spec")
        return self.model_cache_dir / f"{preset}-seed{self.model_seed}"


@contextmanager
def _config_file(path: Path | None) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)


@dataclass(frozen=True)
class SettingLine:
    """One effective setting, for `pio-vllm config`."""

    name: str  # dotted path, e.g. admission.lookahead
    value: Any
    source: str  # default | file | env | override
    description: str


def explain(settings: PioSettings, config_path: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> list[SettingLine]:
    """Every effective setting with where its value came from and what it means."""
    import yaml
    from pydantic_settings import EnvSettingsSource

    path = config_path if config_path is not None else PioSettings.env_config_path()
    from_file = yaml.safe_load(Path(path).read_text()) if path else {}
    from_env = EnvSettingsSource(PioSettings)()
    lines: list[SettingLine] = []

    def source(keys: tuple[str, ...]) -> str:
        for name, tree in (("override", overrides or {}), ("env", from_env),
                           ("file", from_file or {})):
            node: Any = tree
            for key in keys:
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
            else:
                return name
        return "default"

    def walk(model: BaseModel, prefix: tuple[str, ...]) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            keys = (*prefix, name)
            description = info.description or ""
            if isinstance(value, BaseModel):
                walk(value, keys)
            elif isinstance(value, dict) and value and all(
                    isinstance(v, BaseModel) for v in value.values()):
                for key, item in value.items():
                    walk(item, (*keys, key))
            elif isinstance(value, dict) and name in ("engine", "vllm_env"):
                for key, item in value.items():
                    what = (f"vLLM engine argument --{key.replace('_', '-')}, passed through "
                            "verbatim" if name == "engine"
                            else "environment variable set for vLLM's processes")
                    lines.append(SettingLine(".".join((*keys, key)), item,
                                             source((*keys, key)), what))
            else:
                shown = "***" if isinstance(value, SecretStr) else value
                if name == "api_keys" and value:
                    shown = [f"{k.tenant} ({k.priority_class or 'no class'})" for k in value]
                lines.append(SettingLine(".".join(keys), shown, source(keys), description))

    walk(settings, ())
    return lines


def pio_log_level(default: str = "WARNING") -> int:
    """The level of pio's own loggers: `$PIO_LOG_LEVEL` (DEBUG logs each request's stage
    times), else `default`."""
    import logging
    import os

    name = os.environ.get("PIO_LOG_LEVEL", default).upper()
    levels = logging.getLevelNamesMapping()
    if name not in levels:
        raise ConfigError(f"PIO_LOG_LEVEL={name!r} is not a log level; accepted: DEBUG, INFO, "
                          "WARNING, ERROR")
    return levels[name]
