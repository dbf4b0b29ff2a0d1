"""Estimate a request's prompt and vision tokens before admission (frontend process).

SLO admission prices a request in engine seconds before anything is rendered or decoded
for it, so the estimate must be cheap: image sizes come from what is already in memory (a
PIL image's size, the header of inline bytes or of a data URL's first kilobytes, read
without decoding pixels) and Qwen3-VL's resize rule turns them into vision tokens; an
image pio would have to fetch or read first counts as `unknown_vision_tokens`. Text costs
about one token per four characters. The exact counts replace the estimate once intake
has run (the tuner and metrics use those).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from typing import Any

from PIL import Image

from pio_vllm.cost.vision_tokens import VisionGeometry, vision_tokens
from pio_vllm.request import PioRequest

CHARS_PER_TOKEN = 4
HEADER_BYTES = 64 * 1024  # enough for the size field of PNG, JPEG, WebP, GIF headers


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, or None if it cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # any unreadable prefix: the estimate falls back, intake decides
        return None


def header_prefix(payload: str) -> str:
    """The start of a base64 payload that decodes to at most `HEADER_BYTES` (whole 4-char
    groups)."""
    return payload[: HEADER_BYTES * 4 // 3 // 4 * 4]


def data_url_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 data URL's image, from its first kilobytes only."""
    _, sep, payload = url.partition(",")
    if not sep:
        return None
    try:
        return header_size(base64.b64decode(header_prefix(payload), validate=False))
    except (binascii.Error, ValueError):
        return None


def image_tokens(source: Any, geometry: VisionGeometry, unknown: int) -> int:
    """Vision tokens of one image source as far as it can be known without I/O."""
    size: tuple[int, int] | None = None
    if isinstance(source, Image.Image):
        size = source.size
    elif isinstance(source, bytes | bytearray | memoryview):
        size = header_size(bytes(source[:HEADER_BYTES]))
    elif isinstance(source, str) and source.startswith("data:"):
        size = data_url_size(source)
    if size is None:
        return unknown
    try:
        return vision_tokens(size[0], size[1], geometry)
    except ValueError:
        return unknown  # intake refuses it with a proper error


def text_tokens(texts: Iterable[str]) -> int:
    return sum(len(t) for t in texts) // CHARS_PER_TOKEN + 16  # + the chat template's


def estimate_request(request: PioRequest, geometry: VisionGeometry,
                     unknown: int) -> tuple[int, int]:
    """(prompt tokens, vision tokens) of a PioRequest before intake."""
    images: list[Any] = list(request.images)
    texts: list[str] = [request.prompt or ""]
    for message in request.messages or ():
        content = message.get("content") if hasattr(message, "get") else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list | tuple):
            for part in content:
                if not hasattr(part, "get"):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text") or ""))
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    images.append(url.get("url") if hasattr(url, "get") else url)
                elif part.get("type") == "image":
                    images.append(part.get("image"))
    vision = sum(image_tokens(img, geometry, unknown) for img in images)
    return text_tokens(texts) + vision, vision


def estimate_payload(payload: dict[str, Any], image_urls: Iterable[str],
                     geometry: VisionGeometry, unknown: int) -> tuple[int, int]:
    """(prompt tokens, vision tokens) of an OpenAI-style request body before rendering:
    `image_urls` are the image references the gate found (data URLs are sized, others
    count as unknown)."""
    vision = sum(image_tokens(url, geometry, unknown) for url in image_urls)
    return text_tokens(_strings(payload, skip_data=True)) + vision, vision


def _strings(node: Any, skip_data: bool) -> Iterable[str]:
    if isinstance(node, str):
        if not (skip_data and node.startswith("data:")):
            yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in ("tools", "response_format", "model"):
                yield from _strings(value, skip_data)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, skip_data)
