"""Render a PioRequest's prompt or chat messages into model prompt text (frontend process).

The model's own chat template (from its tokenizer) renders the conversation; each image
becomes one `<|vision_start|><|image_pad|><|vision_end|>` placeholder that vLLM's Qwen3-VL
processor expands to the image's vision tokens. Images found in OpenAI-style `image_url`
parts (or Qwen-style `{"type": "image", "image": ...}` parts) are collected in order after the
request's own `images`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pio_vllm.errors import EmptyPromptError, InvalidRequestError, TooManyImagesError
from pio_vllm.request import ImageInput, PioRequest

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class RenderedPrompt:
    """Prompt text with one placeholder per image, and the images in placeholder order."""

    text: str
    images: list[ImageInput]


def _normalise_messages(
    messages: Any, images: list[ImageInput]
) -> tuple[list[dict[str, Any]], bool]:
    """Copy messages, moving image parts' sources into `images`; report if any text exists."""
    if not isinstance(messages, list | tuple) or not messages:
        raise EmptyPromptError(
            f"messages must be a non-empty list of chat messages, got {type(messages).__name__}"
        )
    has_text = False
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidRequestError(
                f"messages[{i}] must be a mapping with 'role' and 'content', got {message!r:.80}"
            )
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            has_text = has_text or bool(content.strip())
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list | tuple):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of parts, "
                f"got {type(content).__name__}"
            )
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                text = part.get("text") or ""
                has_text = has_text or bool(text.strip())
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if not url:
                    raise InvalidRequestError(f"messages[{i}].content[{j}] has no image_url.url")
                images.append(url)
                parts.append({"type": "image"})
            elif kind == "image":
                source = part.get("image")
                if source is None:
                    raise InvalidRequestError(f"messages[{i}].content[{j}] has no 'image' value")
                images.append(source)
                parts.append({"type": "image"})
            else:
                raise InvalidRequestError(
                    f"messages[{i}].content[{j}] has type {kind!r}; accepted: text, image_url, "
                    "image"
                )
        out.append({"role": message["role"], "content": parts})
    return out, has_text


def render_prompt(
    request: PioRequest, tokenizer: Any, max_images: int
) -> RenderedPrompt:
    """Build the prompt text and image list of `request`.

    Raises EmptyPromptError, TooManyImagesError or InvalidRequestError.
    """
    images: list[ImageInput] = list(request.images)
    if request.messages is not None and request.prompt is not None:
        raise InvalidRequestError("give either prompt or messages, not both")
    if request.messages is not None:
        messages, has_text = _normalise_messages(request.messages, images)
        if not has_text and not images:
            raise EmptyPromptError("messages contain no text and no image")
        # Images given in request.images (not in parts) go first in the first user turn.
        extra = len(request.images)
        if extra:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise InvalidRequestError("images were given but messages have no user turn")
            content = first_user["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            first_user["content"] = [{"type": "image"}] * extra + list(content)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif request.prompt is None or not request.prompt.strip():
        raise EmptyPromptError(
            f"prompt is empty ({request.prompt!r}); give non-empty text or messages"
        )
    elif request.raw_prompt:
        text = request.prompt
        found = text.count(IMAGE_PAD)
        if found != len(images):
            raise InvalidRequestError(
                f"raw prompt has {found} {IMAGE_PAD} placeholders but {len(images)} images "
                "were given; they must match"
            )
    else:
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": request.prompt}]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if len(images) > max_images:
        raise TooManyImagesError(
            f"request has {len(images)} images; at most {max_images} are accepted per request"
        )
    return RenderedPrompt(text=text, images=images)
