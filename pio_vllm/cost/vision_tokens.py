"""Qwen3-VL vision-token counts from image sizes (pure code, runs anywhere).

Qwen3-VL's image processor resizes every image with `smart_resize` to multiples of
patch_size * merge_size (16 * 2 = 32 px) with its pixel count clamped to [min_pixels,
max_pixels]; the image then costs (H / 32) * (W / 32) tokens. This module repeats that rule
(transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize`, read from transformers 5.19,
the rule vLLM 0.32's Qwen3VLProcessingInfo uses) so pio can price an image from its header
alone, before any pixel is decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The processor refuses images more elongated than this (transformers raises ValueError).
MAX_ASPECT_RATIO = 200.0


@dataclass(frozen=True)
class VisionGeometry:
    """The numbers that decide an image's token cost."""

    patch_size: int = 16
    merge_size: int = 2
    min_pixels: int = 65536  # Qwen3-VL-2B-Instruct's preprocessor "shortest_edge"
    max_pixels: int = 16777216  # and "longest_edge"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, geometry: VisionGeometry) -> tuple[int, int]:
    """The (height, width) Qwen3-VL's processor resizes an image to."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds {MAX_ASPECT_RATIO:.0f}"
        )
    factor = geometry.factor
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > geometry.max_pixels:
        beta = math.sqrt((height * width) / geometry.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < geometry.min_pixels:
        beta = math.sqrt(geometry.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_tokens(width: int, height: int, geometry: VisionGeometry) -> int:
    """Tokens one image of `width` x `height` pixels occupies in the prompt."""
    h_bar, w_bar = smart_resize(height, width, geometry)
    return (h_bar // geometry.factor) * (w_bar // geometry.factor)
