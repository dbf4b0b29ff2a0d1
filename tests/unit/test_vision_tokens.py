"""Qwen3-VL vision-token rule: known values and the processor's limits."""

from __future__ import annotations

import pytest

from pio_vllm.cost.vision_tokens import VisionGeometry, smart_resize, vision_tokens

G = VisionGeometry()  # patch 16, merge 2, min 65536, max 16777216 pixels


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (320, 240, 80),  # 320x256 after rounding: 10 x 8 (DESIGN.md: 102 prompt tokens)
        (1344, 1008, 1344),  # 1344x1024: 42 x 32
        (224, 224, 64),  # below min_pixels: scaled up to 256x256
        (1024, 768, 768),
    ],
)
def test_known_counts(width: int, height: int, expected: int) -> None:
    assert vision_tokens(width, height, G) == expected


def test_max_pixels_caps_huge_images() -> None:
    g = VisionGeometry(max_pixels=1003520)
    h, w = smart_resize(4000, 6000, g)
    assert h * w <= g.max_pixels and h % 32 == 0 and w % 32 == 0


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        vision_tokens(10000, 20, G)
