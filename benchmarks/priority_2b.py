"""Scenario `priority-2b`: priority at the step on the real 2B architecture (in-process).

    pio-vllm bench priority-2b [--config configs/qwen3-vl-2b-instruct-cpu.yaml]
                               [--preset qwen3-vl-2b] [--rounds N] [--seed S]

The workload of the issue that found the problem: one interactive request alone (its TTFT
is the unloaded reference), then four batch requests with images (224x224 to 640x480) at
once and two interactive requests (224x224 image) 0.5 s and 0.9 s later, 16 output tokens
each. With vLLM's own budgets, the four batch requests were prefilled in one step of ~19 s
(max_num_batched_tokens 8192 takes them all) and the interactive requests waited for it and
for the batch requests' next chunks. The sides are plain vLLM and pio (the same engine
arguments), each in a fresh process, in rounds whose order is drawn from --seed.

A step budget (each step's new work capped while a higher class might arrive) was measured
on this workload against pio without it (record at commit 0f8efdb: no gain, interactive
TTFT p50 6.76 s against 6.73 s) and removed (docs/step-budget.md).

Targets (pio's side): interactive TTFT p50 <= 0.5x the batch requests' p50 and <= 3x the
unloaded interactive TTFT, every request served.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import command_line, report, run_rounds
from benchmarks.harness import BenchRequest, derive_config, ratio
from benchmarks.protocol import Kind, Target
from pio_vllm.admission.metrics import percentile

FLOOD_AT_S = 10.0  # after the unloaded reference has finished on a 2-core CPU
BATCH_SIZES = ((224, 224), (448, 336), (640, 480), (640, 480))


def workload(tokens: int = 16) -> list[BenchRequest]:
    """One interactive request alone at t=0; four batch image requests at FLOOD_AT_S; two
    interactive requests 0.5 s and 0.9 s after them."""
    work = [BenchRequest("unloaded-0", "interactive", 0, "What is in this picture?", tokens,
                         0.0, ((224, 224, 99),))]
    work += [BenchRequest(f"batch-{i}", "batch", 2, "Describe this image in detail.", tokens,
                          FLOOD_AT_S, ((w, h, i),)) for i, (w, h) in enumerate(BATCH_SIZES)]
    work += [BenchRequest(f"inter-{k}", "interactive", 0, "What is in this picture?", tokens,
                          FLOOD_AT_S + at, ((224, 224, 100 + k),))
             for k, at in enumerate((0.5, 0.9))]
    return work


def _ttfts(side: dict[str, Any], prefix: str) -> list[float]:
    return [r["ttft_s"] if r["ok"] and r["ttft_s"] is not None else float("inf")
            for r in side["requests_detail"] if r["id"].startswith(prefix)]


def side_figures(side: dict[str, Any]) -> dict[str, float | None]:
    inter, batch = percentile(_ttfts(side, "inter-"), 50), percentile(_ttfts(side, "batch-"), 50)
    unloaded = percentile(_ttfts(side, "unloaded-"), 50)
    return {"interactive_ttft_p50_s": inter, "batch_ttft_p50_s": batch,
            "unloaded_ttft_s": unloaded,
            "interactive_over_batch": ratio(inter, batch),
            "interactive_over_unloaded": ratio(inter, unloaded),
            "not_served": float(side["requests"] - side["ok"])}


def figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, side in sides.items():
        out |= {f"{name} {key}": value for key, value in side_figures(side).items()}
    out["interactive p50 plain/pio"] = ratio(out["plain interactive_ttft_p50_s"],
                                             out["pio interactive_ttft_p50_s"])
    out["throughput pio/plain"] = ratio(sides["pio"]["output_tok_per_s"],
                                        sides["plain"]["output_tok_per_s"])
    return out


TARGETS = [
    Target("interactive before batch", "pio interactive_over_batch", Kind.AT_MOST, 0.5,
           "interactive TTFT p50 <= 0.5x batch p50, pio (upper bound)"),
    Target("interactive near unloaded", "pio interactive_over_unloaded", Kind.AT_MOST,
           3.0, "interactive TTFT p50 <= 3x unloaded, pio (upper bound)"),
    Target("every request served", "pio not_served", Kind.AT_MOST, 0.0,
           "requests not served, pio: 0 in every round"),
]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenarios import add_round_args

    ap = argparse.ArgumentParser(prog="pio-vllm bench priority-2b",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path,
                    default=Path("configs/qwen3-vl-2b-instruct-cpu.yaml"))
    ap.add_argument("--preset", default="qwen3-vl-2b",
                    help="pio:PRESET model (built once; none: the config's model)")
    ap.add_argument("--tokens", type=int, default=16, help="output tokens per request")
    add_round_args(ap)
    ap.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    out = a.out or Path("benchmarks/results/priority-2b-cpu.json")
    work = workload(a.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        engine = {"model": f"pio:{a.preset}"} if a.preset else {}
        config = derive_config(a.config, Path(tmp) / "config.yaml", engine=engine)
        rounds = run_rounds({"plain": ("plain", str(config)), "pio": ("pio", str(config))},
                            work, mode="inproc", rounds=a.rounds, seed=a.seed)
        report("priority-2b", rounds, mode="inproc", config=str(a.config), out=out,
               seed=a.seed, figures=figures, targets=TARGETS,
               extra={"command": command_line("priority-2b", argv)},
               workload={"requests": len(work), "model": f"pio:{a.preset}",
                         "description": workload.__doc__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
