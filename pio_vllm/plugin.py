"""The seed's plugin entry point, a thin facade over PioEngine (frontend process).

    plugin = create_qwen3_vl_2b_instruct_plugin()
    plugin.initialize(enable_async_multimodal_processing=True)   # any PioSettings field too
    result = await plugin._model.async_process_multimodal_request(
        text="Describe", image="photo.jpg", on_complete=print)
    results = await plugin._model.async_process_batch_multimodal_requests(
        [{"text": "Describe", "image": "photo.jpg"}, {"text": "Hello"}])
    await plugin.shutdown()

The seed's import path works too: `from pio_vllm.models.qwen3_vl_2b.plugin import
create_qwen3_vl_2b_instruct_plugin`. Settings: the `config_path` given, else `$PIO_CONFIG`,
else the Qwen3-VL-2B-Instruct config for this machine (H100 config with CUDA, CPU config
without). Results are `RequestResult` objects (text, token counts, timings, priority,
metadata); a request takes every PioRequest field (`on_complete`, `priority`, `deadline`,
`timeout_s`, `metadata`, `sampling`, `messages`, ...) plus the seed's `text` and `image`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import ConfigError, InvalidRequestError
from pio_vllm.request import ImageInput, PioRequest, RequestResult
from pio_vllm.settings import PioSettings

QWEN3_VL_2B_INSTRUCT = "Qwen/Qwen3-VL-2B-Instruct"
# PioRequest's fields, plus the seed's names for the prompt and a single image.
_PIO_FIELDS = {f.name for f in dataclasses.fields(PioRequest)}
_REQUEST_KEYS = _PIO_FIELDS | {"text", "image", "max_tokens"}


def default_config_for_device() -> Path:
    """configs/qwen3-vl-2b-instruct-{h100,cpu}.yaml by whether CUDA is available."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a vLLM dependency
        on_gpu = False
    return configs / ("qwen3-vl-2b-instruct-h100.yaml" if on_gpu else
                      "qwen3-vl-2b-instruct-cpu.yaml")


def build_request(fields: Mapping[str, Any]) -> PioRequest:
    """A PioRequest from the seed's request dict (`text`, `image`, `max_tokens`) or any of
    PioRequest's own fields; unknown keys are an InvalidRequestError naming them."""
    unknown = sorted(set(fields) - _REQUEST_KEYS)
    if unknown:
        raise InvalidRequestError(
            f"unknown request field(s) {unknown}; accepted: {sorted(_REQUEST_KEYS)}")
    kwargs = {k: v for k, v in fields.items() if k in _PIO_FIELDS}
    if "text" in fields:
        if kwargs.get("prompt") is not None:
            raise InvalidRequestError("give `text` or `prompt`, not both")
        kwargs["prompt"] = fields["text"]
    images: list[ImageInput] = []
    image = fields.get("image")
    if isinstance(image, list | tuple):
        images.extend(image)
    elif image is not None:
        images.append(image)
    images.extend(kwargs.pop("images", ()) or ())
    kwargs["images"] = images
    if fields.get("max_tokens") is not None:
        kwargs["sampling"] = {**dict(kwargs.get("sampling") or {}),
                              "max_tokens": fields["max_tokens"]}
    kwargs["metadata"] = dict(kwargs.get("metadata") or {})
    return PioRequest(**kwargs)


class Qwen3VLModel:
    """The plugin's model: request helpers bound to one running PioEngine."""

    def __init__(self, engine: PioEngine) -> None:
        self.engine = engine

    async def async_process_multimodal_request(self, text: str | None = None,
                                               **fields: Any) -> RequestResult:
        """Run one text(+image) request; raise a PioError on failure. `fields`: `image`,
        `max_tokens`, or any PioRequest field (`on_complete`, `priority`, ...)."""
        request = build_request({"text": text, **fields} if text is not None else fields)
        return await self.engine.complete(request)

    async def async_process_batch_multimodal_requests(
        self, requests: Sequence[Mapping[str, Any]], max_concurrency: int | None = None
    ) -> list[RequestResult]:
        """Run requests concurrently; results in input order, failures as FAILED results
        (with their priority and timings)."""
        built = []
        for i, item in enumerate(requests):
            try:
                built.append(build_request(item))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"requests[{i}]: {e}") from e
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

    def initialize(self, config_path: str | Path | None = None, *,
                   enable_async_multimodal_processing: bool = True,
                   **overrides: Any) -> Qwen3VLModel:
        """Start the engine. `overrides` are PioSettings fields (e.g. engine={...}).

        `enable_async_multimodal_processing=False` decodes images in-line on the event loop
        instead of in pio's thread pool: simpler, and slower when requests overlap."""
        if self._model is not None:
            return self._model
        if not isinstance(enable_async_multimodal_processing, bool):
            raise ConfigError(
                f"enable_async_multimodal_processing={enable_async_multimodal_processing!r}; "
                "accepted: True or False")
        settings = self._settings(config_path, overrides)
        if not enable_async_multimodal_processing:
            settings = settings.model_copy(update={"images": settings.images.model_copy(
                update={"decode_off_loop": False})})
        engine = PioEngine(settings)
        engine.start_blocking()
        self._model = Qwen3VLModel(engine)
        return self._model

    def _settings(self, config_path: str | Path | None,
                  overrides: dict[str, Any]) -> PioSettings:
        path = config_path or self._config_path
        if path is not None or PioSettings.env_config_path() is not None:
            return PioSettings.load(path, **overrides)  # None: $PIO_CONFIG
        settings = PioSettings.load(default_config_for_device(), **overrides)
        if "engine" not in overrides:
            settings = settings.model_copy(
                update={"engine": {**settings.engine, "model": self._default_model}})
        return settings

    async def shutdown(self) -> None:
        if self._model is not None:
            await self._model.engine.shutdown()
            self._model = None


def create_qwen3_vl_2b_instruct_plugin(config_path: str | Path | None = None) -> Qwen3VLPlugin:
    """The Qwen3-VL-2B-Instruct plugin (settings: `config_path`, else `$PIO_CONFIG`, else the
    config for this machine's device)."""
    return Qwen3VLPlugin(config_path=config_path)
