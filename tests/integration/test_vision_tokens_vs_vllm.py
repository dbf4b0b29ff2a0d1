"""pio's vision-token rule agrees with vLLM's own Qwen3-VL processor count (no engine start)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pio_vllm.cost.vision_tokens import vision_tokens
from pio_vllm.engine.vllm_backend import read_geometry

pytestmark = [pytest.mark.engine]

SIZES = [
    (1, 1), (16, 16), (31, 33), (224, 224), (320, 240), (333, 500), (448, 448), (640, 480),
    (800, 600), (896, 672), (1024, 768), (1280, 720), (1344, 1008), (1920, 1080),
    (2048, 2048), (4096, 4096), (6000, 4000), (8192, 64), (64, 8192), (3000, 20),
    (20, 3000), (1000, 999), (1537, 2049),
]


def _vllm_count(model_dir: Path, mm_kwargs: dict[str, Any], width: int, height: int) -> int:
    from vllm import AsyncEngineArgs
    from vllm.multimodal import MULTIMODAL_REGISTRY

    args = AsyncEngineArgs(model=str(model_dir), mm_processor_kwargs=mm_kwargs or None)
    info: Any = MULTIMODAL_REGISTRY.get_processing_info(args.create_model_config())
    return int(info.get_num_image_tokens(
        image_width=width, image_height=height,
        image_processor=info.get_image_processor(), mm_kwargs={}))


@pytest.mark.parametrize("mm_kwargs", [{}, {"max_pixels": 1003520, "min_pixels": 200704}],
                         ids=["checkpoint-limits", "configured-limits"])
def test_counts_match_vllm_for_many_sizes(tiny_model_dir: Path, mm_kwargs: dict) -> None:  # type: ignore[type-arg]
    geometry = read_geometry(str(tiny_model_dir), {"mm_processor_kwargs": mm_kwargs})
    if mm_kwargs:
        assert (geometry.min_pixels, geometry.max_pixels) == (200704, 1003520)
    for width, height in SIZES:
        expected = _vllm_count(tiny_model_dir, mm_kwargs, width, height)
        assert vision_tokens(width, height, geometry) == expected, (width, height)
