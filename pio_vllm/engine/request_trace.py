"""RequestTrace: what pio knows about one request while it runs (frontend process).

One per request, shared by the stages of its path (admission, intake, vLLM, outputs): ids,
priority, timings, token counts, and how pio itself ended it. `result()` turns it into the
caller's RequestResult, whatever the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pio_vllm.errors import PioError
from pio_vllm.request import ImageInfo, RequestOutcome, RequestResult, RequestTimings


@dataclass
class RequestTrace:
    """Mutable state of one request (priority follows vLLM: lower level first)."""

    request_id: str
    arrival_wall: float
    arrival_at: float  # monotonic
    level: int
    class_name: str
    deadline_at: float | None  # monotonic
    metadata: Mapping[str, Any] = field(default_factory=dict)
    granted_at: float | None = None  # left pio's queue
    prepared_at: float | None = None  # intake done (rendered, images loaded)
    submitted_at: float | None = None  # handed to vLLM
    first_token_at: float | None = None
    finished_at: float | None = None
    text: list[str] = field(default_factory=list)  # deltas (in-process path)
    token_ids: list[int] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0
    vision_tokens: int = 0
    images: tuple[ImageInfo, ...] = ()
    preemptions: int | None = None  # inside vLLM; None where vLLM does not report it
    # The error pio ends the request with when pio itself aborted it in vLLM (its deadline
    # passed, the server shut down); None while vLLM decides how it ends.
    aborted_by: PioError | None = None

    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival_at

    def tpot_s(self, now: float) -> float | None:
        """Mean time per output token after the first (None below two tokens)."""
        if self.first_token_at is None or self.output_tokens < 2:
            return None
        end = self.finished_at if self.finished_at is not None else now
        return (end - self.first_token_at) / (self.output_tokens - 1)

    def timings(self) -> RequestTimings:
        return RequestTimings(
            arrival_wall=self.arrival_wall,
            arrival_at=self.arrival_at,
            granted_at=self.granted_at,
            prepared_at=self.prepared_at,
            submitted_at=self.submitted_at,
            first_token_at=self.first_token_at,
            finished_at=self.finished_at,
        )

    def result(self, outcome: RequestOutcome, error: BaseException | None) -> RequestResult:
        return RequestResult(
            request_id=self.request_id,
            outcome=outcome,
            text="".join(self.text),
            token_ids=tuple(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            vision_tokens=self.vision_tokens,
            images=self.images,
            priority=self.level,
            priority_class=self.class_name,
            metadata=dict(self.metadata),
            timings=self.timings(),
            error=error,
            preemptions=self.preemptions,
        )
