"""The bench scenarios' workloads as simulator traces (same generators, same seeds), and
traces as bench workloads for `pio-vllm bench replay`.

A bench request's prompt tokens are counted with the model's own tokenizer (its chat
template and text; each image's placeholder expands to the image's vision tokens, which the
simulator adds from the image's size). A trace row becomes a bench request whose text is
that many tokens of the tiny tokenizer's one-token word and whose image is seeded noise of
the row's size.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import IMAGE_PLACEHOLDER, PROMPT, BenchRequest
from pio_vllm.errors import ConfigError
from pio_vllm.sim.trace import TraceRow

TEXT_TOKEN = "the "  # one token of the tiny tokenizer, whatever its neighbours
RESULTS = Path("benchmarks/results")


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


__all__ = ["IMAGE_PLACEHOLDER", "cpu_mix_trace", "from_trace", "gpu_mix_trace",
           "poisson_trace", "recorded_burst", "recorded_capacity", "scenario_trace",
           "scenario_work", "to_trace"]


def poisson_trace(rate_per_s: float, minutes: float, seed: int,
                  draw: Callable[[float, random.Random], TraceRow]) -> list[TraceRow]:
    """Poisson arrivals at `rate_per_s` for `minutes`; `draw(arrival_s, rng)` makes each
    row from the same seeded RNG (after the arrival's draw)."""
    rng = random.Random(seed)
    rows: list[TraceRow] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t > minutes * 60:
            return rows
        rows.append(draw(round(t, 6), rng))


def gpu_mix_trace(rate_per_s: float, minutes: float, seed: int = 0) -> list[TraceRow]:
    """A GPU-scale mix for capacity planning: Poisson arrivals at `rate_per_s`; 30%
    interactive chat (a 448x448 image, 24-64 text tokens, 64 output tokens), 70% batch work
    (a unique image of 448x448 to 1344x1008, 256 output tokens)."""
    def draw(t: float, rng: random.Random) -> TraceRow:
        if rng.random() < 0.3:
            return TraceRow(t, "interactive", rng.randint(24, 64), 64, 448, 448)
        w, h = rng.choice([(448, 448), (896, 672), (1344, 1008)])
        return TraceRow(t, "batch", rng.randint(24, 64), 256, w, h)

    return poisson_trace(rate_per_s, minutes, seed, draw)


def cpu_mix_trace(rate_per_s: float, minutes: float, seed: int = 0) -> list[TraceRow]:
    """The three classes of configs/tiny-cpu.yaml at the tiny model's scale on a 2-core CPU
    (replayed on the real engine with `pio-vllm bench replay`): Poisson arrivals at
    `rate_per_s`; 30% interactive chat (a 224x224 image, 16-48 text tokens, 16 output
    tokens), 30% standard (no image or a 448x336 one, 32-128 text tokens, 64 output tokens),
    40% batch (a unique 640x480 or 1344x1008 image, 128 output tokens)."""
    def draw(t: float, rng: random.Random) -> TraceRow:
        u = rng.random()
        if u < 0.3:
            return TraceRow(t, "interactive", rng.randint(16, 48), 16, 224, 224)
        if u < 0.6:
            w, h = rng.choice([(0, 0), (448, 336)])
            return TraceRow(t, "standard", rng.randint(32, 128), 64, w, h)
        w, h = rng.choice([(640, 480), (1344, 1008)])
        return TraceRow(t, "batch", rng.randint(16, 48), 128, w, h)

    return poisson_trace(rate_per_s, minutes, seed, draw)


def recorded_capacity() -> float:
    """The in-process req/s of one replica that the committed mixed-resolution record
    measured (its loads are multiples of it)."""
    record = RESULTS / "mixed-resolution-inproc-cpu.json"
    return float(json.loads(record.read_text())["capacity_req_per_s"])


def recorded_burst(base: Path, tmp: Path) -> dict[str, Any]:
    """burst-overload's scenario (`benchmarks.scenarios.burst_overload`) with its `work`
    sized as the committed in-process record sized it from its probe of plain vLLM (the
    scenario's default size where no record or probe is there)."""
    from benchmarks.scenarios import burst_overload

    s: dict[str, Any] = burst_overload(base, tmp, None, False)
    record = RESULTS / "burst-overload-inproc-cpu.json"
    probe = (json.loads(record.read_text()).get("workload", {}).get("capacity_probe")
             if record.is_file() else None)
    s["work"] = s["size_by_capacity"](probe["burst"]) if probe else list(s["work"])
    return s


TRACES = {"gpu-mix": gpu_mix_trace, "cpu-mix": cpu_mix_trace}


def main(argv: list[str] | None = None) -> int:
    """Write a trace: `python -m benchmarks.sim_workloads gpu-mix|cpu-mix RATE MINUTES
    OUT.csv` or
    `python -m benchmarks.sim_workloads SCENARIO MODEL_DIR OUT.csv [--capacity C]`."""
    import argparse
    import sys

    from pio_vllm.sim.trace import write_trace

    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_workloads",
                                 description=main.__doc__)
    ap.add_argument("workload")
    ap.add_argument("args", nargs="+")
    ap.add_argument("--capacity", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if a.workload in TRACES:
        rate, minutes, out = float(a.args[0]), float(a.args[1]), a.args[2]
        rows = TRACES[a.workload](rate, minutes, a.seed)
    else:
        model, out = a.args[0], a.args[1]
        rows = scenario_trace(a.workload, a.capacity, model)
    write_trace(rows, out)
    print(f"wrote {out}: {len(rows)} requests")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
