"""`pio-vllm demo`: what pio is for, on one screen (frontend process).

Builds (or reuses) the tiny local Qwen3-VL unless a model is given and starts the engine.
One interactive request runs alone first: its time to first token is the unloaded
reference. Then a flood of batch requests (images of several sizes, long outputs) arrives
at once, more than the engine runs at a time, and interactive requests arrive one by one
while its first wave decodes: each is sent once the flood has produced a share of that
wave's tokens, so they arrive while the engine is full of batch work on any machine (a
schedule in seconds let a fast machine finish the flood before they came). pio holds the
flood in its queue before rendering it and preempts batch work inside vLLM for each
interactive request, so interactive TTFT stays near the unloaded reference while batch
requests wait their turn. Prints progress, a per-request table and a per-class summary.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import TextIO

import numpy as np
from PIL import Image, ImageDraw

from pio_vllm.engine.pio_engine import PioEngine
from pio_vllm.errors import PioError
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
    after_tokens: int  # sent once the flood has produced this many output tokens (0: at once)
    request: PioRequest


def demo_requests(n_batch: int, n_interactive: int, batch_tokens: int,
                  interactive_tokens: int, first_wave: int) -> list[DemoItem]:
    """The flood (batch, at once, cycling through text and each image size) and the
    interactive requests (224x224 image), the k-th sent once the flood has produced
    (k + 1) / (n_interactive + 1) of 80% of its first wave's tokens (`first_wave`: the
    batch requests the engine runs at once), i.e. while that wave still decodes."""
    kinds: list[tuple[int, int] | None] = [None, *IMAGE_SIZES]
    items = []
    for i in range(n_batch):
        size = kinds[i % len(kinds)]
        items.append(DemoItem(f"batch-{i:02d}", size, 0, PioRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            images=[synthetic_image(*size, seed=i)] if size else [],
            sampling={"max_tokens": batch_tokens, "temperature": 0.0, "ignore_eos": True},
            priority="batch", request_id=f"batch-{i:02d}")))
    wave_tokens = min(n_batch, first_wave) * batch_tokens * 0.8
    for k in range(n_interactive):
        after = int(wave_tokens * (k + 1) / (n_interactive + 1))
        items.append(DemoItem(f"inter-{k:02d}", (224, 224), after, PioRequest(
            prompt="What is in this picture?", images=[synthetic_image(224, 224, 100 + k)],
            sampling={"max_tokens": interactive_tokens, "temperature": 0.0,
                      "ignore_eos": True},
            priority="interactive", request_id=f"inter-{k:02d}")))
    return items


class FloodProgress:
    """Output tokens the flood has produced; `wait_for(n)` returns once it has produced n,
    or once every flood request has ended (a failed flood never holds the others back)."""

    def __init__(self, requests: int) -> None:
        self.tokens = 0
        self._open = requests
        self._changed = asyncio.Condition()

    async def add(self, tokens: int) -> None:
        async with self._changed:
            self.tokens += tokens
            self._changed.notify_all()

    async def ended(self) -> None:
        async with self._changed:
            self._open -= 1
            self._changed.notify_all()

    async def wait_for(self, tokens: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.tokens >= tokens or self._open <= 0)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(items: list[DemoItem], results: list[RequestResult],
                 arrivals_s: list[float]) -> str:
    header = (f"{'request':<9} {'class':<12} {'image':>9} {'vis_tok':>7} {'arrive_s':>8} "
              f"{'queued_ms':>9} {'ttft_ms':>8} {'out_tok':>7} {'preempt':>7} {'status':<8}")
    lines = [header, "-" * len(header)]
    rows = sorted(zip(items, results, arrivals_s, strict=True), key=lambda p: (p[2], p[0].label))
    for item, res, arrival_s in rows:
        size = f"{item.image_size[0]}x{item.image_size[1]}" if item.image_size else "text"
        status = (res.finish_reason or "") if res.ok else type(res.error).__name__
        preempt = "-" if res.preemptions is None else str(res.preemptions)
        lines.append(
            f"{item.label:<9} {res.priority_class or '-':<12} {size:>9} {res.vision_tokens:>7} "
            f"{arrival_s:>8.1f} {_fmt(res.timings.queued_s, 1000):>9} "
            f"{_fmt(res.timings.ttft_s, 1000):>8} {res.output_tokens:>7} {preempt:>7} "
            f"{status:<8}")
    return "\n".join(lines)


def format_summary(results: list[RequestResult], reference: RequestResult,
                   wall_s: float) -> str:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    lines = [f"requests: {len(ok)}/{len(results)} ok in {wall_s:.2f} s "
             f"({out_tokens / wall_s:.1f} output tok/s)",
             f"  interactive alone (unloaded reference): TTFT "
             f"{_fmt(reference.timings.ttft_s, 1000)} ms"]
    for cls in ("interactive", "batch"):
        of_class = [r for r in ok if r.priority_class == cls]
        ttfts = [r.timings.ttft_s for r in of_class if r.timings.ttft_s is not None]
        if not ttfts:
            continue
        preempted = sum(r.preemptions or 0 for r in of_class)
        lines.append(
            f"  {cls:<11} during the flood: {len(ttfts)} requests, TTFT p50 "
            f"{statistics.median(ttfts) * 1000:.0f} ms, max {max(ttfts) * 1000:.0f} ms; "
            f"preempted {preempted} times")
    return "\n".join(lines)


async def run_demo(settings: PioSettings, n_batch: int = 24, n_interactive: int = 6,
                   batch_tokens: int = 128, interactive_tokens: int = 16,
                   out: TextIO = sys.stdout) -> int:
    """Run the demo; return the process exit code (0 when every request finished)."""
    print(f"pio-vllm demo: model {settings.model}; starting the vLLM engine ...", file=out,
          flush=True)
    async with PioEngine.from_settings(settings) as engine:
        backend = engine.backend
        print(f"engine started in {backend.start_s:.1f} s (vLLM "
              f"{'.'.join(map(str, backend.version))}, max_num_seqs {backend.max_num_seqs}, "
              f"policy {backend.scheduling_policy})", file=out, flush=True)
        await engine.complete(PioRequest(prompt="warm up", sampling={"max_tokens": 2}))
        [reference] = await engine.generate_batch([PioRequest(
            prompt="What is in this picture?", images=[synthetic_image(224, 224, 99)],
            sampling={"max_tokens": interactive_tokens, "temperature": 0.0,
                      "ignore_eos": True},
            priority="interactive", request_id="alone")])
        items = demo_requests(n_batch, n_interactive, batch_tokens, interactive_tokens,
                              backend.max_num_seqs)
        print(f"flood: {n_batch} batch requests at once ({batch_tokens} tokens each); "
              f"{n_interactive} interactive requests arrive while it decodes", file=out,
              flush=True)
        done = 0
        flood = FloodProgress(sum(1 for item in items if item.request.priority == "batch"))
        arrivals_s: dict[str, float] = {}
        t0 = time.perf_counter()

        async def one(item: DemoItem) -> RequestResult:
            nonlocal done
            is_flood = item.request.priority == "batch"
            await flood.wait_for(item.after_tokens)
            arrivals_s[item.label] = time.perf_counter() - t0
            ended: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
            # the completion callback gets the result however the request ends, a refusal
            # included
            request = replace(item.request, on_complete=ended.set_result)
            try:
                async for output in engine.generate(request):
                    if is_flood and output.token_ids:
                        await flood.add(len(output.token_ids))
            except PioError:
                pass  # reported from its result
            finally:
                if is_flood:
                    await flood.ended()
            result = await ended
            done += 1
            state = "ok" if result.ok else f"failed: {result.error}"
            print(f"  [{done:>2}/{len(items)}] {item.label} {state}", file=out, flush=True)
            return result

        results = await asyncio.gather(*(one(item) for item in items))
        wall_s = time.perf_counter() - t0
    print(file=out)
    print(format_table(items, list(results), [arrivals_s[i.label] for i in items]), file=out)
    print(file=out)
    print(format_summary(list(results), reference, wall_s), file=out)
    return 0 if all(r.ok for r in results) and reference.ok else 1
