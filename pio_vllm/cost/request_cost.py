"""CostModel: what one request costs the engine (pure code, no vLLM import).

A request's cost is its prompt tokens (text plus each image's vision tokens by Qwen3-VL's
resize rule, from the image size alone), the output tokens it is expected to produce and
the PagedAttention KV blocks those tokens occupy at the engine's block size. Expected output
is `max_tokens` until a class has history; then the 90th percentile of that class's recent
actual lengths (never above `max_tokens`), because most requests stop well before their cap.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pio_vllm.admission.metrics import percentile
from pio_vllm.cost.vision_tokens import VisionGeometry, vision_tokens

# Finished requests of a class needed before its output estimate replaces max_tokens.
MIN_HISTORY = 8


@dataclass(frozen=True)
class RequestCost:
    """Engine cost of one request."""

    prompt_tokens: int  # text plus vision tokens
    vision_tokens: int
    expected_output_tokens: int
    kv_blocks: int  # KV cache blocks for prompt + expected output


class CostModel:
    """Prices requests; learns per-class output lengths from finished requests."""

    def __init__(self, geometry: VisionGeometry, block_size: int, history: int = 64) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._geometry = geometry
        self._block_size = block_size
        self._history = history
        self._lengths: dict[str, collections.deque[int]] = {}

    def cost(self, *, text_tokens: int, image_sizes: Sequence[tuple[int, int]] = (),
             max_tokens: int, class_name: str | None = None) -> RequestCost:
        """`image_sizes`: (width, height) of each image; `text_tokens` excludes them."""
        n_vision = sum(vision_tokens(w, h, self._geometry) for w, h in image_sizes)
        return self.cost_from_tokens(prompt_tokens=text_tokens + n_vision,
                                     vision_tokens=n_vision, max_tokens=max_tokens,
                                     class_name=class_name)

    def cost_from_tokens(self, *, prompt_tokens: int, vision_tokens: int, max_tokens: int,
                         class_name: str | None = None) -> RequestCost:
        """For a prompt already tokenized (vision tokens counted in `prompt_tokens`)."""
        expected = self.expected_output_tokens(class_name, max_tokens)
        blocks = math.ceil((prompt_tokens + expected) / self._block_size)
        return RequestCost(prompt_tokens, vision_tokens, expected, blocks)

    def expected_output_tokens(self, class_name: str | None, max_tokens: int) -> int:
        lengths = self._lengths.get(class_name or "")
        if lengths is None or len(lengths) < MIN_HISTORY:
            return max_tokens
        p90 = percentile(lengths, 90)
        assert p90 is not None
        return max(1, min(max_tokens, math.ceil(p90)))

    def observe_output(self, class_name: str | None, output_tokens: int) -> None:
        """A finished request of `class_name` produced `output_tokens`."""
        lengths = self._lengths.setdefault(
            class_name or "", collections.deque(maxlen=self._history))
        lengths.append(output_tokens)
