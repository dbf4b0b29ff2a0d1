"""The bench scenarios' workloads as simulator traces (same generators, same seeds), and
traces as bench workloads for `pio-vllm bench replay`.

A bench request's prompt tokens are counted with the model's own tokenizer (its chat
template and text; each image's placeholder expands to the image's vision tokens, which the
simulator adds from the image's size). A trace row becomes a bench request whose text is
that many tokens of the tiny tokenizer's one-token word and whose image is seeded noise of
the row's size.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import IMAGE_PLACEHOLDER, PROMPT, BenchRequest
from pio_vllm.errors import ConfigError
from pio_vllm.sim.trace import TraceRow

TEXT_TOKEN = "the "  # one token of the tiny tokenizer, whatever its neighbours


def to_trace(work: list[BenchRequest], model_path: str) -> list[TraceRow]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = []
    for req in work:
        if len(req.images) > 1:
            raise ConfigError(f"request {req.request_id} has {len(req.images)} images; a trace "
                              "row holds at most one")
        text_tokens = len(tokenizer.encode(req.prompt())) - len(req.images)  # pads expand
        w, h = (req.images[0][0], req.images[0][1]) if req.images else (0, 0)
        rows.append(TraceRow(req.arrival_s, req.priority_class, text_tokens, req.max_tokens,
                             w, h))
    return sorted(rows, key=lambda r: r.arrival_s)


def from_trace(rows: list[TraceRow], levels: dict[str, int]) -> list[BenchRequest]:
    """Bench requests replaying a trace on a real engine; the chat template's own tokens
    (about 10) come on top of the row's text tokens."""
    template = len(PROMPT.format("").split()) + 8
    work = []
    for i, row in enumerate(rows):
        text = TEXT_TOKEN * max(1, row.prompt_tokens - template)
        images = ((row.image_w, row.image_h, 7_000_000 + i),) if row.has_image else ()
        work.append(BenchRequest(f"t{i}", row.priority_class, levels[row.priority_class],
                                 text.strip(), row.output_tokens, row.arrival_s, images))
    return work


def scenario_work(name: str, capacity: float | None) -> list[BenchRequest]:
    """The bench requests of a scenario, as its own generator makes them."""
    if name == "priority-inversion-flood":
        from benchmarks.priority_inversion import flood_workload

        return flood_workload(0)
    if name == "priority-inversion-long":
        from benchmarks.priority_inversion import long_workload

        return long_workload(0)
    if name == "burst-overload":
        from benchmarks.scenarios import burst_overload

        with tempfile.TemporaryDirectory() as tmp:
            s: dict[str, Any] = burst_overload(Path("configs/tiny-cpu.yaml"), Path(tmp),
                                               None, False)
        return list(s["work"])
    if name.startswith("mixed-resolution:"):
        from benchmarks.mixed_resolution import mixed_requests, poisson

        if capacity is None:
            raise ConfigError(f"{name}: give --capacity (req/s of one replica)")
        load = float(name.partition(":")[2])
        rng = random.Random(0)
        return mixed_requests(poisson(150, load * capacity, rng), rng)
    raise ConfigError(f"scenario {name!r}; accepted: burst-overload, priority-inversion-flood, "
                      "priority-inversion-long, mixed-resolution:LOAD")


def scenario_trace(name: str, capacity: float | None, model_path: str) -> list[TraceRow]:
    return to_trace(scenario_work(name, capacity), model_path)


__all__ = ["IMAGE_PLACEHOLDER", "from_trace", "scenario_trace", "scenario_work", "to_trace"]
