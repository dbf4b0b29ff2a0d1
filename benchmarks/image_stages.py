"""Where one unique image's time goes before and inside vLLM (per-stage breakdown).

    python -m benchmarks.image_stages [--config configs/tiny-cpu.yaml] [--size 1344x1008]

Frontend stages are timed directly, each on the same unique image, median of `--repeats`:
PNG decode (PIL), resize to the final Qwen3-VL size (smart_resize, bicubic), the model's HF
image processor (what vLLM's frontend runs for every unique image: resize, rescale,
normalize, patchify to fp32 pixel values), vLLM's content hash of the image, and
serialising the pixel values (what travels to the EngineCore). Then, on a real engine:
TTFT of one request with a unique image vs the same image again (vLLM's caches hit) vs text
only, and the engine step time per encoded vision token from BatchLimitScheduler's step
records (vision encoder plus prefill). Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import pickle
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def frontend_stages(model_dir: str, width: int, height: int, repeats: int) -> dict[str, Any]:
    from transformers import AutoImageProcessor
    from vllm.multimodal.hasher import MultiModalHasher

    from pio_vllm.cost.vision_tokens import VisionGeometry, smart_resize

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    h, w = smart_resize(height, width, VisionGeometry())
    out = processor(images=[image], return_tensors="pt")
    pixel_values = out["pixel_values"]
    stages = {
        "png_decode_s": _median_s(lambda: Image.open(io.BytesIO(png)).load(), repeats),
        "resize_to_final_s": _median_s(
            lambda: image.resize((w, h), Image.Resampling.BICUBIC), repeats),
        "hf_processor_s": _median_s(
            lambda: processor(images=[image], return_tensors="pt"), repeats),
        "hf_processor_preresized_s": _median_s(
            lambda: processor(images=[image.resize((w, h), Image.Resampling.BICUBIC)],
                              return_tensors="pt"), repeats),
        "vllm_hash_s": _median_s(
            lambda: MultiModalHasher.hash_kwargs("blake3", image=image), repeats),
        "serialize_pixel_values_s": _median_s(
            lambda: pickle.dumps(pixel_values.numpy(), protocol=5), repeats),
    }
    return {
        "image": f"{width}x{height}", "final_size": f"{w}x{h}", "png_bytes": len(png),
        "pixel_values_shape": list(pixel_values.shape),
        "pixel_values_mb": round(pixel_values.numel() * pixel_values.element_size() / 1e6, 2),
        "stages": {k: round(v, 5) for k, v in stages.items()},
    }


async def engine_stages(config: str, width: int, height: int) -> dict[str, Any]:
    from pio_vllm.engine.pio_engine import PioEngine
    from pio_vllm.request import PioRequest
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(config)
    settings = settings.model_copy(update={"tuning": settings.tuning.model_copy(
        update={"enabled": True, "interval_s": 3600.0})})
    rng = np.random.default_rng(1)

    def unique() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    async with PioEngine(settings) as engine:
        async def ttft(images: list[Image.Image]) -> float:
            result = await engine.complete(PioRequest(
                prompt="Describe.", images=images, sampling={"max_tokens": 2}))
            assert result.timings.ttft_s is not None
            return result.timings.ttft_s

        await ttft([])  # warm up
        same = unique()
        text = statistics.median([await ttft([]) for _ in range(5)])
        uniq = statistics.median([await ttft([unique()]) for _ in range(5)])
        await ttft([same])
        cached = statistics.median([await ttft([same]) for _ in range(5)])
        backend = engine.backend
        await backend.batch_limits(None, None, None)  # drop older step records
        await asyncio.gather(*(ttft([unique()]) for _ in range(4)))
        samples = (await backend.batch_limits(None, None, None))["samples"]
    with_vision = [s for s in samples if s[1] > 0]
    per_vision = (statistics.median(s[3] / s[1] for s in with_vision)
                  if with_vision else None)
    return {"ttft_text_s": round(text, 4), "ttft_unique_image_s": round(uniq, 4),
            "ttft_cached_image_s": round(cached, 4),
            "engine_step_s_per_vision_token": None if per_vision is None
            else round(per_vision, 7),
            "engine_steps_with_images": len(with_vision)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument("--size", default="1344x1008")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/image-stages-cpu.json"))
    a = ap.parse_args()
    width, height = (int(x) for x in a.size.split("x"))
    from pio_vllm.engine.vllm_backend import resolve_model
    from pio_vllm.settings import PioSettings

    model_dir = resolve_model(PioSettings.load(a.config))
    front = frontend_stages(model_dir, width, height, a.repeats)
    engine = asyncio.run(engine_stages(a.config, width, height))
    from benchmarks.harness import environment

    doc = {"frontend": front, "engine": engine, "environment": environment(a.config)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    rows = [f"| {k} | {v * 1000:.1f} |" for k, v in front["stages"].items()]
    rows += [f"| {k} | {v * 1000:.1f} |" for k, v in engine.items()
             if k.startswith("ttft") and v is not None]
    if engine["engine_step_s_per_vision_token"] is not None:
        n_tokens = (int(front["final_size"].split("x")[0]) // 32) * (
            int(front["final_size"].split("x")[1]) // 32)
        rows.append(f"| engine step per image ({n_tokens} vision tokens) | "
                    f"{engine['engine_step_s_per_vision_token'] * n_tokens * 1000:.1f} |")
    table = "\n".join([f"one unique {front['image']} image (final {front['final_size']}, "
                       f"{front['pixel_values_mb']} MB fp32 pixel values)", "",
                       "| stage | ms |", "|---|---|", *rows])
    a.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
