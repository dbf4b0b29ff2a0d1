"""RequestIntake: turn an admitted PioRequest into what vLLM takes (frontend process, asyncio).

The intake stage of `PioEngine.generate()`: it runs after admission (a queued request costs
nothing here) and renders the prompt with the model's chat template, loads the images
(thread pool, content-hash cache), counts vision tokens with Qwen3-VL's resize rule and
checks the context length, so that vLLM receives token ids plus decoded images. It takes the
running engine's tokenizer and limits as plain values (no vLLM import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pio_vllm.cost.vision_tokens import VisionGeometry, vision_tokens
from pio_vllm.errors import ImageError, PromptTooLongError
from pio_vllm.intake.image_loader import ImageLoader, LoadedImage
from pio_vllm.intake.prompt_renderer import render_prompt
from pio_vllm.request import ImageInfo, PioRequest
from pio_vllm.settings import ImageSettings


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready for vLLM."""

    prompt_token_ids: list[int]
    images: list[LoadedImage]
    image_infos: tuple[ImageInfo, ...]
    prompt_tokens: int  # text tokens plus vision tokens, as vLLM will count them
    vision_tokens: int
    sampling_params: Any  # vLLM SamplingParams, DELTA outputs

    def engine_input(self) -> dict[str, Any]:
        """The prompt dict `AsyncLLM.generate` takes."""
        prompt: dict[str, Any] = {"prompt_token_ids": self.prompt_token_ids}
        if self.images:
            prompt["multi_modal_data"] = {"image": [img.image for img in self.images]}
        return prompt


def max_images_per_request(settings: ImageSettings, engine_limit: int) -> int:
    """pio's per-request image limit: the setting, never above vLLM's limit_mm_per_prompt."""
    limit = settings.max_images_per_request
    return engine_limit if limit is None else min(limit, engine_limit)


class RequestIntake:
    """Prepares requests for one running engine."""

    def __init__(self, images: ImageLoader, *, tokenizer: Any, geometry: VisionGeometry,
                 max_model_len: int, max_images: int) -> None:
        self._images = images
        self._tokenizer = tokenizer
        self._geometry = geometry
        self._max_model_len = max_model_len
        self.max_images = max_images

    async def prepare(self, request: PioRequest, sampling_params: Any) -> PreparedRequest:
        """Render, load images, count tokens; raises a typed InvalidRequestError subclass."""
        rendered = render_prompt(request, self._tokenizer, self.max_images)
        loaded = await self._images.load_all(rendered.images)
        infos = []
        for i, img in enumerate(loaded):
            try:
                n = vision_tokens(img.width, img.height, self._geometry)
            except ValueError as e:
                raise ImageError(f"{e}; accepted aspect ratios are up to 200:1", i) from e
            infos.append(ImageInfo(img.width, img.height, n, img.content_hash))
        token_ids = self._tokenizer.encode(rendered.text, add_special_tokens=False)
        n_vision = sum(info.vision_tokens for info in infos)
        prompt_tokens = len(token_ids) - len(infos) + n_vision
        if prompt_tokens >= self._max_model_len:
            raise PromptTooLongError(
                f"prompt is {prompt_tokens} tokens (text plus vision tokens); the model's "
                f"max_model_len is {self._max_model_len} and at least one output token must "
                "fit", prompt_tokens=prompt_tokens, max_model_len=self._max_model_len)
        return PreparedRequest(
            prompt_token_ids=list(token_ids),
            images=loaded,
            image_infos=tuple(infos),
            prompt_tokens=prompt_tokens,
            vision_tokens=n_vision,
            sampling_params=sampling_params,
        )
