"""`pio-vllm demo`: a mixed batch through PioEngine, with a per-request table (frontend process).

Builds (or reuses) the tiny local Qwen3-VL unless a model is given, starts the engine,
sends text-only and image requests of several sizes in two priority classes at once, shows
progress as requests finish, and prints a per-request table and totals.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import numpy as np
from PIL import Image, ImageDraw

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.request import PioRequest, RequestResult
from pio_vllm.settings import PioSettings

IMAGE_SIZES = ((224, 224), (448, 336), (640, 480), (1024, 768))
PROMPTS = (
    "Describe this image briefly.",
    "What colours and shapes are in the picture?",
    "Give a short caption for this photo.",
    "What is in the centre of the image?",
)


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A seeded picture: a colour gradient with a few filled shapes."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x + y) / 2
    pixels = (c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None])
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1 = min(width - 1, x0 + int(rng.integers(8, max(9, width // 3))))
        y1 = min(height - 1, y0 + int(rng.integers(8, max(9, height // 3))))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


@dataclass(frozen=True)
class DemoItem:
    label: str
    image_size: tuple[int, int] | None
    request: PioRequest


def demo_requests(n: int, max_tokens: int) -> list[DemoItem]:
    """`n` requests cycling through text-only and each image size, alternating two classes."""
    kinds: list[tuple[int, int] | None] = [None, *IMAGE_SIZES]
    items = []
    for i in range(n):
        size = kinds[i % len(kinds)]
        priority = "interactive" if i % 3 == 0 else "batch"
        images = [synthetic_image(size[0], size[1], seed=i)] if size else []
        request = PioRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            images=images,
            sampling={"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
            priority=priority,
            request_id=f"demo-{i:02d}",
            metadata={"kind": "text" if size is None else "image"},
        )
        items.append(DemoItem(f"demo-{i:02d}", size, request))
    return items


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(items: list[DemoItem], results: list[RequestResult]) -> str:
    header = (
        f"{'request':<9} {'class':<12} {'prio':>4} {'image':>9} {'vis_tok':>7} {'prompt':>6} "
        f"{'ttft_ms':>8} {'out_tok':>7} {'tok/s':>7} {'status':<8}"
    )
    lines = [header, "-" * len(header)]
    for item, res in zip(items, results, strict=True):
        size = f"{item.image_size[0]}x{item.image_size[1]}" if item.image_size else "text"
        status = res.finish_reason or "" if res.ok else type(res.error).__name__
        lines.append(
            f"{item.label:<9} {res.priority_class or '-':<12} {res.priority:>4} {size:>9} "
            f"{res.vision_tokens:>7} {res.prompt_tokens:>6} "
            f"{_fmt(res.timings.ttft_s, 1000):>8} {res.output_tokens:>7} "
            f"{_fmt(res.tokens_per_s, 1, 1):>7} {status:<8}"
        )
    return "\n".join(lines)


def format_totals(results: list[RequestResult], wall_s: float) -> str:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    lines = [
        f"requests: {len(ok)}/{len(results)} ok in {wall_s:.2f} s "
        f"({len(ok) / wall_s:.2f} req/s, {out_tokens / wall_s:.1f} output tok/s)"
    ]
    for cls in sorted({r.priority_class for r in ok}, key=str):
        ttfts = [r.timings.ttft_s for r in ok if r.priority_class == cls and r.timings.ttft_s]
        if ttfts:
            lines.append(
                f"  {cls}: {len(ttfts)} requests, TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms"
                f", max {max(ttfts) * 1000:.0f} ms"
            )
    return "\n".join(lines)


async def run_demo(
    settings: PioSettings, n_requests: int, max_tokens: int, out: TextIO = sys.stdout
) -> int:
    """Run the demo; return the process exit code (0 when every request finished)."""
    print(f"pio-vllm demo: model {settings.model}; starting the vLLM engine ...", file=out)
    async with PioEngine.from_settings(settings) as engine:
        print(
            f"engine started in {engine.backend.start_s:.1f} s "
            f"(vLLM {'.'.join(map(str, engine.backend.version))}, "
            f"policy {engine.backend.scheduling_policy})",
            file=out,
        )
        items = demo_requests(n_requests, max_tokens)
        done = 0
        t0 = time.perf_counter()

        async def one(item: DemoItem) -> RequestResult:
            nonlocal done
            [result] = await engine.generate_batch([item.request])
            done += 1
            state = "ok" if result.ok else f"failed: {result.error}"
            print(f"  [{done:>2}/{len(items)}] {item.label} {state}", file=out, flush=True)
            return result

        results = await asyncio.gather(*(one(item) for item in items))
        wall_s = time.perf_counter() - t0
    print(file=out)
    print(format_table(items, list(results)), file=out)
    print(file=out)
    print(format_totals(list(results), wall_s), file=out)
    return 0 if all(r.ok for r in results) else 1
