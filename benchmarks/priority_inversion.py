"""Scenario `priority-inversion`: a flood of long low-priority requests, then high-priority ones.

    python -m benchmarks.priority_inversion [--config configs/tiny-cpu.yaml] [--repeats 1]

32 batch-class requests of 1024 output tokens arrive over the first 2 s (the engine's
max_num_seqs run, the rest wait), then 8 interactive requests of 16 tokens arrive one every
0.5 s from t=3 s. Plain vLLM (priority
scheduling, same engine arguments) orders its waiting queue but never preempts running
work, so interactive requests wait for a running request to finish; pio preempts the
least-progressed batch requests and resumes them later. Each side runs in a fresh process,
alternating plain, pio, plain, pio when repeated. Writes JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BenchRequest,
    environment,
    ratio,
    run_side_subprocess,
    write_workload,
)

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light",
         "water", "road", "window")


def workload(seed: int = 0, n_low: int = 32, low_tokens: int = 1024, low_spread_s: float = 2.0,
             n_high: int = 8, high_tokens: int = 16, high_start_s: float = 3.0,
             high_every_s: float = 0.5) -> list[BenchRequest]:
    """Low-priority requests arrive spread over `low_spread_s` (so running ones are at
    different points of their outputs, as in a real flood); high-priority ones arrive one
    every `high_every_s` from `high_start_s`, each meeting the flood at a different moment."""
    rng = random.Random(seed)

    def text() -> str:
        return "tell me about " + " ".join(rng.choice(WORDS) for _ in range(12))

    low = [BenchRequest(f"low-{i}", "batch", 2, text(), low_tokens,
                        round(rng.uniform(0.0, low_spread_s), 3)) for i in range(n_low)]
    high = [BenchRequest(f"high-{i}", "interactive", 0, text(), high_tokens,
                         high_start_s + i * high_every_s) for i in range(n_high)]
    return low + high


def compare(plain: dict[str, Any], pio: dict[str, Any]) -> dict[str, Any]:
    hp, hq = plain["classes"]["interactive"], pio["classes"]["interactive"]
    lp, lq = plain["classes"]["batch"], pio["classes"]["batch"]
    return {
        "high_ttft_p50_plain_over_pio": ratio(hp["ttft_p50_s"], hq["ttft_p50_s"]),
        "high_ttft_p99_plain_over_pio": ratio(hp["ttft_p99_s"], hq["ttft_p99_s"]),
        "low_ttft_p50_pio_over_plain": ratio(lq["ttft_p50_s"], lp["ttft_p50_s"]),
        "throughput_pio_over_plain": ratio(pio["output_tok_per_s"], plain["output_tok_per_s"]),
    }


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | side | hi TTFT p50 (s) | hi TTFT p99 (s) | lo TTFT p50 (s) | "
             "lo e2e p50 (s) | out tok/s | preemptions |",
             "|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs):
        for side in ("plain", "pio"):
            r = run[side]
            hi, lo = r["classes"]["interactive"], r["classes"]["batch"]
            lines.append(f"| {i} | {side} | {hi['ttft_p50_s']} | {hi['ttft_p99_s']} | "
                         f"{lo['ttft_p50_s']} | {lo['e2e_p50_s']} | {r['output_tok_per_s']} | "
                         f"{lo['preemptions']} |")
        c = run["ratios"]
        lines.append(f"| {i} | ratio | plain/pio {c['high_ttft_p50_plain_over_pio']}x | "
                     f"plain/pio {c['high_ttft_p99_plain_over_pio']}x | pio/plain "
                     f"{c['low_ttft_p50_pio_over_plain']}x | | pio/plain "
                     f"{c['throughput_pio_over_plain']}x | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny-cpu.yaml")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/priority-inversion-cpu.json"))
    a = ap.parse_args()
    work = workload(a.seed)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        wl = Path(tmp) / "workload.jsonl"
        write_workload(work, wl)
        for rep in range(a.repeats):
            print(f"repeat {rep + 1}/{a.repeats}", flush=True)
            plain = run_side_subprocess("plain", a.config, wl, Path(tmp) / f"plain{rep}.json")
            pio = run_side_subprocess("pio", a.config, wl, Path(tmp) / f"pio{rep}.json")
            for side in (plain, pio):
                side.pop("rows", None)
            runs.append({"plain": plain, "pio": pio, "ratios": compare(plain, pio)})
    result = {"scenario": "priority-inversion", "config": a.config, "seed": a.seed,
              "workload": {"low": "32 x batch, 1024 tokens, arrivals over 0-2 s",
                           "high": "8 x interactive, 16 tokens, one every 0.5 s from 3 s"},
              "environment": environment(a.config), "runs": runs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    table = markdown(runs)
    a.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
