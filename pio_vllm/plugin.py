"""The seed's plugin entry point, a thin facade over PioEngine (frontend process).

    plugin = create_qwen3_vl_2b_instruct_plugin()
    plugin.initialize(enable_async_multimodal_processing=True)   # any PioSettings field too
    result = await plugin.model.async_process_multimodal_request(text="Describe", image=img)
    results = await plugin.model.async_process_batch_multimodal_requests(
        [{"text": "Describe", "image": img}, {"text": "Hello"}])
    await plugin.shutdown()

Results are `RequestResult` objects (text, token counts, timings, priority, metadata).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import ConfigError, InvalidRequestError
from pio_vllm.request import ImageInput, PioRequest, RequestResult
from pio_vllm.settings import PioSettings

QWEN3_VL_2B_INSTRUCT = "Qwen/Qwen3-VL-2B-Instruct"
_REQUEST_KEYS = {"text", "image", "images", "priority", "metadata", "max_tokens", "sampling",
                 "request_id", "deadline", "timeout_s"}


def _default_config() -> Path:
    configs = Path(__file__).resolve().parent.parent / "configs"
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a vLLM dependency
        on_gpu = False
    return configs / ("qwen3-vl-2b-instruct-h100.yaml" if on_gpu else
                      "qwen3-vl-2b-instruct-cpu.yaml")


class Qwen3VLModel:
    """The plugin's model: request helpers bound to one running PioEngine."""

    def __init__(self, engine: PioEngine) -> None:
        self.engine = engine

    @staticmethod
    def _request(
        text: str | None,
        image: ImageInput | Sequence[ImageInput] | None = None,
        images: Sequence[ImageInput] | None = None,
        priority: str | int | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        timeout_s: float | None = None,
    ) -> PioRequest:
        all_images: list[ImageInput] = []
        if image is not None:
            if isinstance(image, list | tuple):
                all_images.extend(image)
            else:
                all_images.append(image)  # type: ignore[arg-type]
        all_images.extend(images or ())
        params = dict(sampling or {})
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        return PioRequest(prompt=text, images=all_images, sampling=params, priority=priority,
                          metadata=dict(metadata or {}), request_id=request_id,
                          deadline=deadline, timeout_s=timeout_s)

    async def async_process_multimodal_request(self, text: str | None = None,
                                               **kwargs: Any) -> RequestResult:
        """Run one text(+image) request; raise a PioError on failure."""
        unknown = set(kwargs) - _REQUEST_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown request field(s) {sorted(unknown)}; accepted: {sorted(_REQUEST_KEYS)}"
            )
        return await self.engine.complete(self._request(text, **kwargs))

    async def async_process_batch_multimodal_requests(
        self, requests: Sequence[Mapping[str, Any]], max_concurrency: int | None = None
    ) -> list[RequestResult]:
        """Run requests concurrently; results in input order, failures as FAILED results."""
        built = []
        for i, item in enumerate(requests):
            unknown = set(item) - _REQUEST_KEYS
            if unknown:
                raise InvalidRequestError(
                    f"requests[{i}] has unknown field(s) {sorted(unknown)}; accepted: "
                    f"{sorted(_REQUEST_KEYS)}"
                )
            built.append(self._request(**dict(item)))
        return await self.engine.generate_batch(built, max_concurrency=max_concurrency)


class Qwen3VLPlugin:
    """Creates and owns the engine; `model` (also `_model`) serves requests."""

    def __init__(self, config_path: str | Path | None = None,
                 default_model: str = QWEN3_VL_2B_INSTRUCT) -> None:
        self._config_path = config_path
        self._default_model = default_model
        self._model: Qwen3VLModel | None = None

    @property
    def model(self) -> Qwen3VLModel:
        if self._model is None:
            raise ConfigError("plugin is not initialized; call plugin.initialize() first")
        return self._model

    def initialize(self, config_path: str | Path | None = None, **overrides: Any) -> Qwen3VLModel:
        """Start the engine. `overrides` are PioSettings fields (e.g. engine={...})."""
        if self._model is not None:
            return self._model
        async_mm = overrides.pop("enable_async_multimodal_processing", True)
        if async_mm is not True:
            raise ConfigError(
                f"enable_async_multimodal_processing={async_mm!r}: pio always decodes images "
                "off the event loop; only True is accepted"
            )
        path = config_path or self._config_path
        if path is None:
            path = _default_config()
            settings = PioSettings.load(path, **overrides)
            if "engine" not in overrides:
                settings = settings.model_copy(
                    update={"engine": {**settings.engine, "model": self._default_model}})
        else:
            settings = PioSettings.load(path, **overrides)
        engine = PioEngine(settings)
        engine.start_blocking()
        self._model = Qwen3VLModel(engine)
        return self._model

    async def shutdown(self) -> None:
        if self._model is not None:
            await self._model.engine.shutdown()
            self._model = None


def create_qwen3_vl_2b_instruct_plugin(config_path: str | Path | None = None) -> Qwen3VLPlugin:
    """The Qwen3-VL-2B-Instruct plugin (config defaults to the CPU or H100 config)."""
    return Qwen3VLPlugin(config_path=config_path)
