"""ModelledEngine: one replica's engine in the simulator (runs in the simulator's process, on
its virtual-time asyncio loop).

vLLM's own v1 `Scheduler` runs unchanged: for pio, the class pio's EngineCore builds from
`scheduler_cls` (priority preemption, batch limits: patches/), for plain
vLLM its default `Scheduler`, both from the same `VllmConfig` that `AsyncEngineArgs`
resolves for the settings' engine arguments (max_num_seqs, token and encoder budgets,
chunked prefill, the priority policy, prefix caching), with the KV cache's block count that
vLLM would size from the configured KV space. Only the model is replaced: each step's
`SchedulerOutput` gets a fabricated `ModelRunnerOutput` (one sampled token for every request
whose scheduled tokens reach the end of what it has to compute, none for a partial prefill
chunk; `ignore_eos`, so outputs have their fixed lengths), as vLLM's own scheduler tests
build them (tests/v1/core/test_scheduler.py), and the step takes the profile's time on the
virtual clock. What cannot run outside the EngineCore is modelled: the worker (the step's
time) and the output processor (first token and finish times per request).

vLLM versions: written against vLLM 0.32's `Request`, `Scheduler` and `ModelRunnerOutput`
signatures; other releases are refused with a clear error.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings
from pio_vllm.sim.profile import SimProfile

SAMPLED_TOKEN = 11  # any id that is not EOS: outputs have fixed lengths (ignore_eos)
IMAGE_PAD = 7  # the placeholder tokens of an image (its identity is in its mm feature)
IDLE_STEP_LIMIT = 10_000  # steps that schedule nothing before the run is declared stuck


@dataclass
class RequestState:
    """What the modelled output processor knows of one request."""

    request_id: str
    submitted_at: float
    output_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    first: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class EngineSnapshot:
    """What vLLM's per-step stats tell the frontend (as EngineStatsProbe reports)."""

    kv_cache_usage: float
    num_running: int
    num_waiting: int
    inter_token_s_total: float
    inter_tokens_total: int


def _check_vllm() -> None:
    from pio_vllm.engine.vllm_backend import vllm_version

    if vllm_version() < (0, 32):
        raise ConfigError("the simulator drives vLLM 0.32's Scheduler and Request classes; "
                          "this vLLM is older (run it where vLLM 0.32 is installed)")


class ModelledEngine:
    """vLLM's scheduler stepped on virtual time with a step-time profile."""

    def __init__(self, settings: PioSettings, model_path: str, profile: SimProfile,
                 rng: random.Random, *, pio: bool) -> None:
        _check_vllm()
        import importlib

        from vllm.utils.hashing import sha256_cbor
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        from pio_vllm.engine.vllm_backend import build_engine_args, install_pio_scheduler

        self._profile = profile
        self._rng = rng
        for key, value in settings.vllm_env.items():  # as vLLM's processes would see them
            os.environ[key] = value
        config = build_engine_args(settings, model_path).create_engine_config()
        self.vllm_config = config
        cls: type[Any] = Scheduler
        if pio:
            path = install_pio_scheduler(config, settings)
            if path is not None:
                module, _, name = path.rpartition(".")
                cls = getattr(importlib.import_module(module), name)
        block_size = int(config.cache_config.block_size)
        kv_cache_config, num_blocks = _kv_cache_config(config, profile, block_size)
        config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = cls(vllm_config=config, kv_cache_config=kv_cache_config,
                             structured_output_manager=StructuredOutputManager(config),
                             block_size=block_size, log_stats=True)
        init_none_hash(sha256_cbor)
        self._hasher = get_request_block_hasher(block_size, sha256_cbor)
        self.max_model_len = int(config.model_config.max_model_len)
        self.max_num_seqs = int(config.scheduler_config.max_num_seqs)
        self.states: dict[str, RequestState] = {}
        self.listeners: list[Callable[[EngineSnapshot], None]] = []
        self._work = asyncio.Event()
        self._itl_s, self._itl_n = 0.0, 0
        self.steps = 0
        self.busy_s = 0.0

    # -- requests ---------------------------------------------------------------------

    def submit(self, request_id: str, prompt_tokens: int, vision_tokens: int,
               output_tokens: int, priority: int, token_seed: int) -> RequestState:
        """Add a request (its text tokens, then one image of `vision_tokens`); the prompt's
        token ids are the request's own, so no two requests share a prefix block."""
        from vllm.multimodal.inputs import (
            MultiModalFeatureSpec,
            MultiModalKwargsItem,
            PlaceholderRange,
        )
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        own = 1000 + token_seed % 100_000
        tokens = [own] * max(1, prompt_tokens)
        features = None
        if vision_tokens:
            offset = len(tokens)
            tokens += [IMAGE_PAD] * vision_tokens + [own]
            features = [MultiModalFeatureSpec(
                data=MultiModalKwargsItem.dummy(), modality="image",
                identifier=f"{request_id}-image", mm_hash=f"{request_id}-image",
                mm_position=PlaceholderRange(offset=offset, length=vision_tokens))]
        loop = asyncio.get_running_loop()
        request = Request(
            request_id=request_id, prompt_token_ids=tokens,
            sampling_params=SamplingParams(max_tokens=output_tokens, ignore_eos=True),
            pooling_params=None, mm_features=features, priority=priority,
            arrival_time=loop.time(), block_hasher=self._hasher)
        state = RequestState(request_id, loop.time())
        self.states[request_id] = state
        self.scheduler.add_request(request)
        self._work.set()
        return state

    def fits(self, prompt_tokens: int, vision_tokens: int, output_tokens: int) -> bool:
        """Whether the request fits the model's context (pio and vLLM refuse it otherwise)."""
        return prompt_tokens + vision_tokens + 1 + output_tokens <= self.max_model_len

    def abort(self, request_id: str) -> None:
        from vllm.v1.request import RequestStatus

        if request_id in self.scheduler.requests:
            self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
        state = self.states.pop(request_id, None)
        if state is not None:
            state.done.set()
            state.first.set()

    def in_flight(self) -> int:
        return len(self.states)

    # -- the step loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Step while there is work; wait for work otherwise (the engine's busy loop)."""
        loop = asyncio.get_running_loop()
        idle_steps = 0
        while True:
            if not self.scheduler.has_requests():
                self._work.clear()
                await self._work.wait()
                continue
            output = self.scheduler.schedule()
            idle_steps = 0 if output.total_num_scheduled_tokens else idle_steps + 1
            if idle_steps > IDLE_STEP_LIMIT:
                raise ConfigError(
                    f"the modelled engine scheduled nothing for {IDLE_STEP_LIMIT} steps with "
                    f"{len(self.scheduler.requests)} requests held (KV cache or encoder "
                    "budget too small for them?)")
            step_s = self._profile.step_s(
                int(output.total_num_scheduled_tokens), self._image_tokens(output), self._rng)
            self.steps += 1
            self.busy_s += step_s
            await asyncio.sleep(step_s)
            self._finish_step(output, loop.time())

    def _image_tokens(self, output: Any) -> list[int]:
        sizes = []
        for req_id, inputs in (output.scheduled_encoder_inputs or {}).items():
            request = self.scheduler.requests.get(req_id)
            if request is not None:
                sizes += [int(request.get_num_encoder_embeds(i)) for i in inputs]
        return sizes

    def _finish_step(self, output: Any, now: float) -> None:
        from vllm.v1.outputs import ModelRunnerOutput

        ids = list(output.num_scheduled_tokens)
        sampled = []
        for req_id in ids:
            request = self.scheduler.requests.get(req_id)
            done = request is not None and request.num_computed_tokens >= request.num_tokens
            sampled.append([SAMPLED_TOKEN] if done else [])
        runner_output = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
            pooler_output=[])
        for outputs in self.scheduler.update_from_output(output, runner_output).values():
            for out in outputs.outputs:
                state = self.states.get(out.request_id)
                if state is None:
                    continue
                if out.new_token_ids:
                    if state.last_token_at is not None:
                        self._itl_s += now - state.last_token_at
                        self._itl_n += len(out.new_token_ids)
                    if state.first_token_at is None:
                        state.first_token_at = now
                        state.first.set()
                    state.last_token_at = now
                    state.output_tokens += len(out.new_token_ids)
                if out.finish_reason is not None:
                    state.finished_at = now
                    state.first.set()
                    state.done.set()
                    del self.states[out.request_id]
        snapshot = EngineSnapshot(
            kv_cache_usage=float(self.scheduler.kv_cache_manager.usage),
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            inter_token_s_total=self._itl_s, inter_tokens_total=self._itl_n)
        for listener in self.listeners:
            listener(snapshot)


def _kv_cache_config(config: Any, profile: SimProfile, block_size: int) -> tuple[Any, int]:
    """The KV cache vLLM would size: the profile's KV space (GiB), else the CPU build's
    VLLM_CPU_KVCACHE_SPACE, at the model's bytes per token."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model = config.model_config
    layers = int(model.get_num_layers(config.parallel_config))
    kv_heads = int(model.get_num_kv_heads(config.parallel_config))
    head = int(model.get_head_size())
    dtype = model.dtype if isinstance(model.dtype, torch.dtype) else torch.float32
    per_token = 2 * layers * kv_heads * head * torch.tensor([], dtype=dtype).element_size()
    gib = profile.kv_cache_gib
    if gib is None:
        gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))
    num_blocks = max(16, int(gib * (1 << 30) // (per_token * block_size)))
    spec = FullAttentionSpec(block_size, num_kv_heads=kv_heads, head_size=head, dtype=dtype)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]), num_blocks
