"""Request and result types (frontend process; pure Python, no vLLM import).

A `PioRequest` is what a caller hands to `PioEngine.generate()`; `PioOutput` is one item of
the stream it yields; the last item carries a `RequestResult` with the whole text, token
counts and timings. Priority follows vLLM: a lower level is served first; a request names a
configured class ("interactive") or gives a level (0).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from PIL import Image

# An image as a caller may give it: a PIL image, a file path, encoded bytes, or a URL string
# ("data:image/png;base64,...", "http(s)://...", or a plain path).
ImageInput = Union["Image.Image", str, Path, bytes, bytearray, memoryview]

CompletionCallback = Callable[["RequestResult"], Awaitable[None] | None]


class RequestOutcome(enum.Enum):
    """How a request ended."""

    FINISHED = "finished"  # generation ended (stop token, stop string or max_tokens)
    FAILED = "failed"  # an error ended it; RequestResult.error says which
    CANCELLED = "cancelled"  # the caller stopped consuming or cancelled its task


@dataclass
class PioRequest:
    """One generation request.

    Give `prompt` (plain text; pio wraps it in the model's chat template with one image
    placeholder per image, unless `raw_prompt` is set) or `messages` (OpenAI-style chat
    messages; `image_url` parts are taken as images in order, after `images`).

    `sampling` holds vLLM SamplingParams fields verbatim (max_tokens, temperature, top_p,
    seed, stop, ignore_eos, ...); the settings' `sampling_defaults` fill the rest.
    `priority` is a class name or an integer level (lower first); None uses the default class.
    `deadline` is an absolute wall-clock time (`time.time()` seconds); `timeout_s` is the same
    relative to the call. `on_complete` (sync or async) receives the final RequestResult once,
    however the request ends; an exception it raises is logged and does not affect the stream.
    """

    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    images: Sequence[ImageInput] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)
    priority: str | int | None = None
    deadline: float | None = None
    timeout_s: float | None = None
    request_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    on_complete: CompletionCallback | None = None
    raw_prompt: bool = False

    def resolved_id(self) -> str:
        """The caller's request_id, or a fresh one."""
        return self.request_id or f"pio-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class ImageInfo:
    """What pio learned about one image: its size as sent to vLLM and its token cost."""

    width: int
    height: int
    vision_tokens: int
    content_hash: str


@dataclass(frozen=True)
class RequestTimings:
    """Monotonic timestamps (`time.monotonic()`, seconds) of one request's life, plus the wall
    clock arrival. The path: arrival -> pio's queue -> granted -> intake (render, images) ->
    prepared -> submitted to vLLM -> first token -> finished."""

    arrival_wall: float
    arrival_at: float
    granted_at: float | None = None  # left pio's queue
    prepared_at: float | None = None  # intake done: prompt rendered, images loaded
    submitted_at: float | None = None  # handed to vLLM
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def queued_s(self) -> float | None:
        """Time waiting in pio's queue before any work was done for the request."""
        return None if self.granted_at is None else self.granted_at - self.arrival_at

    @property
    def intake_s(self) -> float | None:
        """pio's own frontend work after the queue: rendering, image intake, checks."""
        if self.prepared_at is None or self.granted_at is None:
            return None
        return self.prepared_at - self.granted_at

    @property
    def ttft_s(self) -> float | None:
        """Time from arrival to the first output token."""
        return None if self.first_token_at is None else self.first_token_at - self.arrival_at

    @property
    def e2e_s(self) -> float | None:
        """Time from arrival to the end."""
        return None if self.finished_at is None else self.finished_at - self.arrival_at

    @property
    def decode_s(self) -> float | None:
        """Time from first to last token."""
        if self.first_token_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.first_token_at


@dataclass(frozen=True)
class RequestResult:
    """The end state of one request, given to `on_complete` and by `generate_batch`."""

    request_id: str
    outcome: RequestOutcome
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    vision_tokens: int
    images: tuple[ImageInfo, ...]
    priority: int | None  # None only when the request's priority could not be resolved
    priority_class: str | None
    metadata: Mapping[str, Any]
    timings: RequestTimings
    error: BaseException | None = None
    # Times pio's scheduler preempted it inside vLLM for higher-priority work (vLLM 0.32
    # reports it per request; None on releases that do not, such as 0.23).
    preemptions: int | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float | None:
        """Output tokens per second over the request's decode time."""
        decode_s = self.timings.decode_s
        if decode_s is None or decode_s <= 0 or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / decode_s

    @property
    def ok(self) -> bool:
        return self.outcome is RequestOutcome.FINISHED


@dataclass(frozen=True)
class PioOutput:
    """One item of a request's stream: the new text and token ids since the last item.

    `result` is set on the last item only (`finished` True).
    """

    request_id: str
    text_delta: str
    token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None
    result: RequestResult | None = None
