"""VllmBackend: the one adapter between pio and vLLM's AsyncLLM (frontend process).

It builds the AsyncLLM (EngineCore and CPU worker run in spawned child processes), resolves
'pio:PRESET' models to locally built checkpoints, validates engine arguments against
`vllm.AsyncEngineArgs`, converts sampling dicts to `SamplingParams`, and translates vLLM's
errors into pio's tree. Everything pio needs from vLLM goes through here, so the version
differences live in one file: read from vLLM 0.32.0 (the supported release) and 0.23.0 (the
release that fits the GPU machine); `AsyncLLM.generate/abort`, `priority`, stat loggers and
`RequestOutputKind.DELTA` exist in both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from pio_vllm.cost.vision_tokens import VisionGeometry
from pio_vllm.engine.stats_probe import (
    EngineStatsProbe,
    prometheus_logger,
    silent_prometheus_logger,
)
from pio_vllm.errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    InvalidSamplingError,
    PromptTooLongError,
)
from pio_vllm.settings import PioSettings

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.23", "0.32")

# pio's scheduler subclasses (patches/): priority preemption, plus runtime batch limits when
# tuning is on; the async variants where vLLM runs async scheduling (GPU).
_SCHEDULERS = {
    (False, False): "pio_vllm_patches.priority_preemption.PriorityPreemptionScheduler",
    (False, True): "pio_vllm_patches.priority_preemption.PriorityPreemptionAsyncScheduler",
    (True, False): "pio_vllm_patches.batch_limit_scheduler.BatchLimitScheduler",
    (True, True): "pio_vllm_patches.batch_limit_scheduler.BatchLimitAsyncScheduler",
}


def _validation_errors() -> tuple[type[Exception], ...]:
    """Exception types vLLM raises for an invalid request (0.23: ValueError; 0.32 adds
    VLLMValidationError, which is not a ValueError)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, VLLMValidationError)


@dataclasses.dataclass(frozen=True)
class FrontendSlot:
    """This process is API server `index` of `count` in front of an EngineCore that the
    parent started (`pio-vllm serve --api-server-count N`): vLLM's `client_config` (its
    ZMQ addresses and sockets for this process) and pio's node ledger file."""

    index: int
    count: int
    client_config: Mapping[str, Any]
    ledger_path: str


def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
    return major, minor


def resolve_model(settings: PioSettings) -> str:
    """The model path or id vLLM should load; builds 'pio:PRESET' checkpoints on first use."""
    preset = settings.local_model_preset()
    if preset is None:
        return settings.model
    from pio_vllm.model_builder import PRESETS, build_model, is_built

    if preset not in PRESETS:
        raise ConfigError(
            f"engine.model {settings.model!r} names no local preset; accepted: "
            f"{['pio:' + p for p in PRESETS]}, a checkpoint path or a hub id"
        )
    out = settings.local_model_dir()
    if not is_built(out):
        logger.info("building %s checkpoint once into %s", settings.model, out)
        build_model(out, preset=preset, seed=settings.model_seed)
    return str(out)


def build_engine_args(settings: PioSettings, model_path: str) -> Any:
    """`vllm.AsyncEngineArgs` from settings.engine, verbatim (plain vLLM's arguments);
    unknown keys raise ConfigError."""
    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(settings.engine) - known)
    if unknown:
        raise ConfigError(
            f"unknown vLLM engine argument(s) {unknown}; engine.* takes AsyncEngineArgs fields "
            "(the `vllm serve` flags in snake_case)"
        )
    kwargs = dict(settings.engine)
    kwargs["model"] = model_path
    try:
        return AsyncEngineArgs(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid vLLM engine arguments {kwargs}: {e}") from e


def engine_config(settings: PioSettings, usage: Any,
                  api_processes: tuple[int, int] | None = None) -> tuple[Any, Any, str, str | None]:
    """(engine args, resolved VllmConfig with pio's scheduler installed, model path, the
    scheduler's import path or None) for the engine `settings` describe: vLLM's environment
    set, the model built if needed. `api_processes`: (count, this one's rank, -1 for the
    parent that starts the EngineCore) with several API-server processes."""
    for key, value in settings.vllm_env.items():
        # vLLM reads its environment in the spawned EngineCore and worker processes,
        # which inherit ours: set before they start.
        os.environ[key] = str(value)
    model_path = resolve_model(settings)
    args = build_engine_args(settings, model_path)
    if api_processes is not None:
        args._api_process_count, args._api_process_rank = api_processes
    try:
        vllm_config = args.create_engine_config(usage)
    except Exception as e:
        raise ConfigError(f"invalid vLLM engine arguments for {model_path!r}: {e}") from e
    if int(getattr(vllm_config.parallel_config, "data_parallel_size", 1)) > 1:
        raise ConfigError(
            f"data_parallel_size={vllm_config.parallel_config.data_parallel_size}: pio "
            "admits into one engine (its capacity and KV usage are one engine's); run one "
            "replica per engine behind a router instead: pio-vllm serve-replicas "
            "--replicas N (tensor and pipeline parallelism pass through)")
    return args, vllm_config, model_path, install_pio_scheduler(vllm_config, settings)


def install_pio_scheduler(vllm_config: Any, settings: PioSettings) -> str | None:
    """Put pio's scheduler (patches/) and its settings into a resolved VllmConfig; returns
    the scheduler's import path, or None when neither preemption nor tuning needs it.

    Runs after vLLM resolved the config, because the scheduler must match vLLM's choice of
    async scheduling. The settings reach the EngineCore in `additional_config["pio"]`."""
    preemption = settings.admission.preemption
    # BatchLimitScheduler records the step samples the step model is fitted on: batch
    # tuning and SLO admission both need them.
    tuning = settings.tuning.enabled or settings.slo_admission_on()
    scheduler_config = vllm_config.scheduler_config
    if preemption and str(scheduler_config.policy) != "priority":
        raise ConfigError(
            f"admission.preemption needs engine.scheduling_policy: priority (it is "
            f"{str(scheduler_config.policy)!r}, under which vLLM ignores request priorities); "
            "set scheduling_policy: priority, or admission.preemption: false")
    if not (preemption or tuning):
        return None
    current = scheduler_config.scheduler_cls
    if current is not None and current not in _SCHEDULERS.values():
        raise ConfigError(
            f"engine.scheduler_cls={current!r} conflicts with pio's scheduler, which "
            "admission.preemption and tuning.enabled need; unset scheduler_cls or turn both "
            "off")
    path = _SCHEDULERS[(tuning, bool(scheduler_config.async_scheduling))]
    scheduler_config.scheduler_cls = path
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    vllm_config.additional_config["pio"] = {
        "preemption": preemption, "max_preemptions": settings.admission.max_preemptions}
    return path


def read_geometry(model_path: str, engine: Mapping[str, Any]) -> VisionGeometry:
    """Patch/merge sizes and min/max pixels of the model's image processor."""
    import json

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    vision = getattr(cfg, "vision_config", None)
    patch = int(getattr(vision, "patch_size", 16))
    merge = int(getattr(vision, "spatial_merge_size", 2))
    size: dict[str, int] = {}
    pre = Path(model_path) / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        size = dict(data.get("size") or {})
        if "min_pixels" in data:
            size["shortest_edge"] = data["min_pixels"]
        if "max_pixels" in data:
            size["longest_edge"] = data["max_pixels"]
    else:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model_path)
        size = dict(getattr(proc, "size", {}) or {})
    mm_kwargs = dict(engine.get("mm_processor_kwargs") or {})
    override = dict(mm_kwargs.get("size") or {})
    if "min_pixels" in mm_kwargs:
        override["shortest_edge"] = mm_kwargs["min_pixels"]
    if "max_pixels" in mm_kwargs:
        override["longest_edge"] = mm_kwargs["max_pixels"]
    size.update(override)
    default = VisionGeometry()
    return VisionGeometry(
        patch_size=patch,
        merge_size=merge,
        min_pixels=int(size.get("shortest_edge", default.min_pixels)),
        max_pixels=int(size.get("longest_edge", default.max_pixels)),
    )


class VllmBackend:
    """Owns one AsyncLLM. Create with `start()`; stop with `shutdown()`."""

    def __init__(self, llm: Any, settings: PioSettings, model_path: str,
                 probe: EngineStatsProbe, start_s: float) -> None:
        self._llm = llm
        self._settings = settings
        self.probe = probe
        self.start_s = start_s
        self.version = vllm_version()
        model_config = llm.model_config
        self.max_model_len: int = int(model_config.max_model_len)
        mm_config = model_config.multimodal_config
        self.max_images_engine: int = (
            int(mm_config.get_limit_per_prompt("image")) if mm_config is not None else 0
        )
        self.scheduling_policy: str = str(llm.vllm_config.scheduler_config.policy)
        scheduler_config = llm.vllm_config.scheduler_config
        self.max_num_seqs: int = int(scheduler_config.max_num_seqs)
        self.max_num_batched_tokens: int = int(scheduler_config.max_num_batched_tokens)
        self.block_size: int = int(llm.vllm_config.cache_config.block_size)
        blocks = getattr(llm.vllm_config.cache_config, "num_gpu_blocks", None)
        self.kv_blocks_total: int | None = int(blocks) if blocks else None
        self.geometry = read_geometry(model_path, settings.engine)
        self.tokenizer = self._get_tokenizer()

    @classmethod
    def start(cls, settings: PioSettings, usage_context: Any | None = None,
              frontend: FrontendSlot | None = None) -> VllmBackend:
        """Build the model if needed and start vLLM's engine (blocks; ~30-60 s on CPU);
        with `frontend`, connect to the EngineCore the parent process started instead."""
        major_minor = vllm_version()
        if f"{major_minor[0]}.{major_minor[1]}" not in SUPPORTED_VLLM:
            logger.warning(
                "vLLM %d.%d is not a tested release (tested: %s)", *major_minor, SUPPORTED_VLLM
            )
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        usage = usage_context or UsageContext.ENGINE_CONTEXT
        client: dict[str, Any] = {}
        if frontend is None:
            args, vllm_config, model_path, scheduler = engine_config(settings, usage)
        else:
            args, vllm_config, model_path, scheduler = engine_config(
                settings, usage, api_processes=(frontend.count, frontend.index))
            addresses = dict(frontend.client_config)
            client = {"client_addresses": addresses,
                      "client_count": addresses.pop("client_count", frontend.count),
                      "client_index": addresses.pop("client_index", frontend.index)}
        probe = EngineStatsProbe()
        loggers: list[Any] = [probe.logger_factory()]
        loggers.append(silent_prometheus_logger() if args.disable_log_stats
                       else prometheus_logger(probe))
        t0 = time.perf_counter()
        try:
            llm = AsyncLLM.from_vllm_config(
                vllm_config, usage_context=usage, stat_loggers=loggers,
                enable_log_requests=args.enable_log_requests,
                disable_log_stats=args.disable_log_stats, **client)
        except Exception as e:
            raise ConfigError(f"vLLM engine failed to start for model {model_path!r}: {e}") from e
        if scheduler is not None:
            logger.info("vLLM runs pio's scheduler %s", scheduler)
        start_s = time.perf_counter() - t0
        logger.info("vLLM engine started in %.1fs (model %s)", start_s, model_path)
        return cls(llm, settings, model_path, probe, start_s)

    def _get_tokenizer(self) -> Any:
        tok = getattr(self._llm, "tokenizer", None)
        if tok is None:
            raise ConfigError(
                "vLLM engine has no tokenizer (skip_tokenizer_init?); pio renders chat prompts "
                "with the model's tokenizer and needs it"
            )
        return tok

    @property
    def llm(self) -> Any:
        """The AsyncLLM (for adapters such as the OpenAI server); do not call its internals."""
        return self._llm

    # -- requests -----------------------------------------------------------------------

    def sampling_params(self, sampling: Mapping[str, Any]) -> Any:
        """vLLM SamplingParams (DELTA outputs) from a dict of its fields."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        merged = {**self._settings.sampling_defaults, **dict(sampling)}
        max_tokens = merged.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
        ):
            raise InvalidSamplingError(
                f"max_tokens={max_tokens!r} is invalid; accepted: an integer >= 1"
            )
        known = {f for f in SamplingParams.__struct_fields__} if hasattr(
            SamplingParams, "__struct_fields__") else set()
        unknown = sorted(k for k in merged if known and k not in known)
        if unknown or "output_kind" in merged or merged.get("n", 1) != 1:
            bad = unknown or ["output_kind" if "output_kind" in merged else "n"]
            raise InvalidSamplingError(
                f"sampling field(s) {bad} are not accepted; give vLLM SamplingParams fields "
                "other than output_kind, with n=1"
            )
        try:
            return SamplingParams(**merged, output_kind=RequestOutputKind.DELTA)
        except _validation_errors() as e:
            raise InvalidSamplingError(f"invalid sampling parameters {merged}: {e}") from e

    async def generate(
        self, prompt: Mapping[str, Any], params: Any, request_id: str, priority: int,
        **vllm_kwargs: Any,
    ) -> AsyncGenerator[Any, None]:
        """vLLM's output stream for one request, with vLLM errors translated.

        `vllm_kwargs`: further `AsyncLLM.generate` keywords (lora_request, trace_headers, ...)
        that the OpenAI server passes through."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        try:
            engine_input = await self._render(prompt)
            async for out in self._llm.generate(
                engine_input, params, request_id, priority=priority, **vllm_kwargs
            ):
                yield out
        except VllmEngineDead as e:
            raise EngineDeadError(f"vLLM engine died while serving {request_id}: {e}") from e
        except Exception as e:
            translated = self._translate(e, request_id)
            if translated is None:
                raise
            raise translated from e

    async def _render(self, prompt: Mapping[str, Any]) -> dict[str, Any]:
        """The engine input vLLM's generate takes. vLLM 0.32 renders a raw prompt (pio's
        token ids and images) with its Renderer, as its own deprecated path inside the
        InputProcessor did, which warns "Passing raw prompts to InputProcessor is
        deprecated" (read in 0.32's v1/engine/input_processor.py); the async variant runs
        the image processor off the event loop. vLLM 0.23 has no Renderer and takes the raw
        prompt. An input vLLM already rendered (the OpenAI server's) passes unchanged."""
        renderer = getattr(self._llm, "renderer", None)
        if "type" in prompt or renderer is None or not hasattr(renderer, "render_cmpl_async"):
            return dict(prompt)
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        parsed = parse_model_prompt(self._llm.model_config, dict(prompt))
        [engine_input] = await renderer.render_cmpl_async(
            [parsed], renderer.default_cmpl_tok_params)
        return dict(engine_input)

    def _translate(self, e: Exception, request_id: str) -> Exception | None:
        cause = e.__cause__ if type(e).__name__ == "EngineGenerateError" else e
        if isinstance(cause, _validation_errors()):
            message = str(cause)
            if "longer than the maximum model length" in message:
                return PromptTooLongError(
                    f"request {request_id}: {message}", prompt_tokens=-1,
                    max_model_len=self.max_model_len,
                )
            return InvalidRequestError(f"request {request_id} rejected by vLLM: {message}")
        return None

    async def batch_limits(self, max_active: int | None, max_tokens: int | None,
                           token_floor: int | None, max_encoder_tokens: int | None = None
                           ) -> dict[str, Any]:
        """Set BatchLimitScheduler's limits in the EngineCore and collect its step samples
        (an engine-core utility call to the method patches/engine_core_batch_limits.py
        adds; `call_utility_async` exists in vLLM 0.23 and 0.32)."""
        result: dict[str, Any] = await self._llm.engine_core.call_utility_async(
            "pio_batch_limits", max_active, max_tokens, token_floor, max_encoder_tokens)
        return result

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def num_unfinished(self) -> int:
        """Requests vLLM's frontend still tracks (waiting or running in the engine)."""
        # AsyncLLM.get_num_unfinished_requests is 0.32-only; its output processor has the
        # same count in 0.23 and 0.32.
        return int(self._llm.output_processor.get_num_unfinished_requests())

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def shutdown(self) -> None:
        self._llm.shutdown()
