"""Find every media reference in an OpenAI / Anthropic / Responses request body (pure code).

vLLM's chat parser (vllm/renderers/chat_utils.py, read from vLLM 0.32.0) takes media from
typed content parts (image_url, input_image, image_embeds, image_pil, audio_url,
input_audio, video_url, *_embeds, prompt_embeds), from untyped parts that carry one of
those keys, from parts that name only a `uuid` (a reference into vLLM's media cache), and
the Anthropic route converts `{"type": "image", "source": {...}}` blocks into image URLs.
Rather than follow each route's schema, the scan walks the whole body and reports every
object that vLLM could read media from, wherever it sits (messages, Responses `input`,
tool results, a future route's field), except inside JSON-schema-carrying fields (tools,
response formats), where such keys are names in a schema, not media.

What pio does with each reference is the gate's business (fetch and rewrite, check, or
refuse); this module only finds them and gives a way to rewrite an image URL in place.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# Keys whose values are schemas or grammars, not content: never scanned.
SCHEMA_KEYS = frozenset({
    "tools", "functions", "tool_choice", "response_format", "structured_outputs",
    "guided_json", "guided_grammar", "guided_regex", "guided_choice", "json_schema",
    "logit_bias", "text_format",
})
# Keys that carry media pio does not accept (only images by URL or inline bytes are).
REFUSED_KEYS = {
    "image_pil": "PIL images", "image_embeds": "image embeddings",
    "audio_url": "audio", "input_audio": "audio", "audio_embeds": "audio embeddings",
    "video_url": "video", "video_embeds": "video embeddings",
    "prompt_embeds": "prompt embeddings", "file_id": "file references",
    "file_data": "files", "file_url": "files",
}
MEDIA_TYPES = frozenset({
    "image_url", "input_image", "image", "image_pil", "image_embeds", "audio_url",
    "input_audio", "video_url", "audio_embeds", "video_embeds", "prompt_embeds", "file",
    "input_file",
})
MAX_DEPTH = 256  # the gate bounds JSON depth far below this


class MediaKind(enum.Enum):
    IMAGE_URL = "image_url"  # an http(s), data: or file: URL of an image
    ANTHROPIC_BASE64 = "anthropic_base64"  # {"type": "base64", "media_type", "data"}
    REFUSED = "refused"  # media pio does not accept; `detail` says which


@dataclass
class MediaRef:
    """One media reference found in a body."""

    kind: MediaKind
    where: str  # JSON path, for error messages
    value: str = ""  # the URL, or the base64 data
    detail: str = ""  # for REFUSED: what it is
    media_type: str = ""  # ANTHROPIC_BASE64: the declared type
    _set: Callable[[str], None] | None = None

    def replace_url(self, url: str) -> None:
        """Rewrite this reference to the image at `url` (a data URL), in place."""
        assert self._set is not None
        self._set(url)


def scan(body: Any) -> list[MediaRef]:
    """Every media reference in `body` (a parsed JSON value), in document order."""
    return list(_walk(body, "$", 0))


def _walk(node: Any, where: str, depth: int) -> Iterator[MediaRef]:
    if depth > MAX_DEPTH:
        return
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{where}[{i}]", depth + 1)
        return
    if not isinstance(node, dict):
        return
    yield from _media_in(node, where)
    for key, value in node.items():
        if key in SCHEMA_KEYS or (key == "text" and isinstance(value, dict)):
            continue
        if key in ("image_url", "source") and isinstance(value, dict):
            continue  # already read as this part's media
        yield from _walk(value, f"{where}.{key}", depth + 1)


def _media_in(part: dict[str, Any], where: str) -> Iterator[MediaRef]:
    part_type = part.get("type")
    found = False
    for key, what in REFUSED_KEYS.items():
        if key in part:
            found = True
            yield MediaRef(MediaKind.REFUSED, f"{where}.{key}", detail=what)
    if "image_url" in part:
        found = True
        image_url = part["image_url"]
        if isinstance(image_url, dict):
            yield _url_ref(image_url.get("url"), f"{where}.image_url.url",
                           functools.partial(operator.setitem, image_url, "url"))
        else:
            yield _url_ref(image_url, f"{where}.image_url",
                           functools.partial(operator.setitem, part, "image_url"))
    source = part.get("source")
    if part_type == "image" and isinstance(source, dict):
        found = True
        yield from _anthropic(source, f"{where}.source")
    if "uuid" in part and (found or part_type in MEDIA_TYPES):
        yield MediaRef(MediaKind.REFUSED, f"{where}.uuid",
                       detail="media references by uuid (vLLM's shared media cache)")
    elif part_type in MEDIA_TYPES and not found:
        yield MediaRef(MediaKind.REFUSED, where, detail=f"a {part_type!r} part without an "
                       "image URL")


def _url_ref(value: Any, where: str, setter: Callable[[str], None]) -> MediaRef:
    if not isinstance(value, str) or not value:
        return MediaRef(MediaKind.REFUSED, where, detail=f"an image URL of {value!r:.40}")
    return MediaRef(MediaKind.IMAGE_URL, where, value=value, _set=setter)


def _anthropic(source: dict[str, Any], where: str) -> Iterator[MediaRef]:
    kind = source.get("type")
    if kind == "url":
        def setter(url: str, s: dict[str, Any] = source) -> None:
            # an inline copy of what pio fetched, in the Anthropic shape
            header, _, data = url.partition(",")
            s.clear()
            s.update(type="base64", media_type=header[5:].split(";")[0], data=data)

        yield _url_ref(source.get("url"), f"{where}.url", setter)
    elif kind == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            yield MediaRef(MediaKind.REFUSED, f"{where}.data", detail="an empty base64 image")
        else:
            yield MediaRef(MediaKind.ANTHROPIC_BASE64, f"{where}.data", value=data,
                           media_type=str(source.get("media_type") or ""))
    else:
        yield MediaRef(MediaKind.REFUSED, f"{where}.type",
                       detail=f"an image source of type {kind!r}")
