"""Scenario `priority-inversion`: a flood of long low-priority requests, then urgent ones.

    pio-vllm bench priority-inversion [--mode inproc|server] [--workload flood|long]
                                      [--repeats N] [--config FILE]

Workloads (seeded; the same requests on both sides):

- `flood` (default; the HTTP case): 48 batch chat requests, each with the same 320x240
  image and 256 output tokens, arrive at once at t=1 s; 8 interactive requests (16 tokens,
  the same image) arrive together at t=2 s. Two interactive requests at t=0 and t=0.5 s,
  before the flood, measure the unloaded TTFT of the same request.
- `long`: 32 batch requests of 1024 output tokens arrive over the first 2 s; 8 interactive
  requests of 16 tokens arrive one every 0.5 s from t=3 s (text only).

Plain vLLM (priority scheduling, same engine arguments) orders its waiting queue but never
preempts running work, and its server renders every arrival in order; pio holds the flood
in its queue before any rendering and preempts a batch request inside vLLM's scheduler for
each urgent one. Each side runs in a fresh process or server, alternating when repeated.
Reports per run: urgent TTFT p50/p99 under the flood, the unloaded TTFT, plain/pio ratios
and throughput pio/plain (shed or failed requests count as not served).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import report, run_ab
from benchmarks.harness import BenchRequest, derive_config, ratio, ratio_text
from pio_vllm.admission.metrics import percentile

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light",
         "water", "road", "window")
IMAGE = (320, 240, 7)  # one image for every request of the flood workload (same pixels)


def _text(rng: random.Random) -> str:
    return "tell me about " + " ".join(rng.choice(WORDS) for _ in range(12))


def flood_workload(seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    unloaded = [BenchRequest(f"unloaded-{i}", "interactive", 0, _text(rng), 16, t, (IMAGE,))
                for i, t in enumerate((0.0, 0.5))]
    low = [BenchRequest(f"low-{i}", "batch", 2, _text(rng), 256, 1.0, (IMAGE,))
           for i in range(48)]
    high = [BenchRequest(f"high-{i}", "interactive", 0, _text(rng), 16, 2.0, (IMAGE,))
            for i in range(8)]
    return unloaded + low + high


def long_workload(seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    low = [BenchRequest(f"low-{i}", "batch", 2, _text(rng), 1024,
                        round(rng.uniform(0.0, 2.0), 3)) for i in range(32)]
    high = [BenchRequest(f"high-{i}", "interactive", 0, _text(rng), 16, 3.0 + i * 0.5)
            for i in range(8)]
    return low + high


WORKLOADS = {"flood": flood_workload, "long": long_workload}


def _ttfts(side: dict[str, Any], prefix: str) -> list[float]:
    """TTFTs of one side's requests whose id starts with `prefix`; a request that was not
    served counts as never answered (infinite TTFT)."""
    return [r["ttft_s"] if r["ok"] and r["ttft_s"] is not None else float("inf")
            for r in side["requests_detail"] if r["id"].startswith(prefix)]


def checks(run: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers the scenario is judged by, from one run (ratios within the run)."""
    out: dict[str, Any] = {}
    for name, side in run.items():
        high, unloaded = _ttfts(side, "high-"), _ttfts(side, "unloaded-")
        out[name] = {
            "high_ttft_p50_s": _r(percentile(high, 50)),
            "high_ttft_p99_s": _r(percentile(high, 99)),
            "unloaded_ttft_max_s": _r(max(unloaded)) if unloaded else None,
            "low_ttft_p50_s": _r(percentile(_ttfts(side, "low-"), 50)),
            "output_tok_per_s": side["output_tok_per_s"],
            # in-process: per request (vLLM 0.32 reports it); server: pio's counter
            "preemptions": side.get("preemptions") if side.get("preemptions") is not None
            else sum(c.get("preemptions") or 0 for c in side["classes"].values()),
        }
    plain, pio = out.get("plain"), out.get("pio")
    if plain and pio:
        out["ratios"] = {
            "high_ttft_p99_plain_over_pio": ratio(plain["high_ttft_p99_s"],
                                                  pio["high_ttft_p99_s"]),
            "high_ttft_p50_plain_over_pio": ratio(plain["high_ttft_p50_s"],
                                                  pio["high_ttft_p50_s"]),
            "pio_high_ttft_p99_over_unloaded": ratio(pio["high_ttft_p99_s"],
                                                     pio["unloaded_ttft_max_s"]),
            "throughput_pio_over_plain": ratio(pio["output_tok_per_s"],
                                               plain["output_tok_per_s"]),
        }
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def markdown(all_checks: list[dict[str, Any]]) -> str:
    lines = ["| run | side | urgent TTFT p50 / p99 (s) | unloaded TTFT max (s) | "
             "low TTFT p50 (s) | out tok/s | preemptions |", "|---|---|---|---|---|---|---|"]
    for i, c in enumerate(all_checks):
        for side in ("plain", "pio"):
            s = c[side]
            lines.append(f"| {i} | {side} | {s['high_ttft_p50_s']} / {s['high_ttft_p99_s']} | "
                         f"{s['unloaded_ttft_max_s']} | {s['low_ttft_p50_s']} | "
                         f"{s['output_tok_per_s']} | {s['preemptions']} |")
        r = c["ratios"]
        lines.append(f"| {i} | ratios | p99 plain/pio "
                     f"{ratio_text(r['high_ttft_p99_plain_over_pio'])}, "
                     f"p50 {ratio_text(r['high_ttft_p50_plain_over_pio'])} | pio p99/unloaded "
                     f"{ratio_text(r['pio_high_ttft_p99_over_unloaded'])} | | pio/plain "
                     f"{ratio_text(r['throughput_pio_over_plain'])} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pio-vllm bench priority-inversion",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["inproc", "server"], default="inproc")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="flood")
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = a.out or Path(
        f"benchmarks/results/priority-inversion-{a.workload}-{a.mode}-cpu.json")
    work = WORKLOADS[a.workload](a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        # The flood's 48 requests all wait in pio's queue: room for them in the batch class.
        config = str(derive_config(a.config, Path(tmp) / "inversion.yaml"))
        runs = run_ab({"plain": ("plain", config), "pio": ("pio", config)}, work,
                      mode=a.mode, repeats=a.repeats)
        doc = report(f"priority-inversion-{a.workload}", runs, mode=a.mode,
                     config=str(a.config), out=out,
                     workload={"name": a.workload, "requests": len(work),
                               "description": (WORKLOADS[a.workload].__name__)})
    all_checks = [checks(run) for run in doc["runs"]]
    doc["checks"] = all_checks
    out.write_text(json.dumps(doc, indent=1))
    table = markdown(all_checks)
    with out.with_suffix(".md").open("a") as f:
        f.write("\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
