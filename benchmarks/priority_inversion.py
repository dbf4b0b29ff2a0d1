"""Scenario `priority-inversion`: a flood of long low-priority requests, then urgent ones.

    pio-vllm bench priority-inversion [--mode inproc|server] [--workload flood|long]
                                      [--rounds N] [--seed S] [--config FILE]

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
each urgent one. Each side runs in a fresh process or server, in rounds whose side order is
drawn from --seed. Reports per round: urgent TTFT p50/p99 under the flood, the unloaded
TTFT, plain/pio ratios and throughput pio/plain (shed or failed requests count as not
served), and the targets' verdicts from the median and 95% interval over rounds.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import command_line, report, run_rounds
from benchmarks.harness import BenchRequest, derive_config, ratio
from benchmarks.protocol import Kind, Target
from pio_vllm.admission.metrics import percentile

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light",
         "water", "road", "window")
IMAGE = (320, 240, 7)  # one image for every request of the flood workload (same pixels)


def _text(rng: random.Random) -> str:
    return "tell me about " + " ".join(rng.choice(WORDS) for _ in range(12))


def flood_workload(seed: int = 0) -> list[BenchRequest]:
    """48 batch requests (320x240 image, 256 tokens) at t=1 s, 8 urgent ones at t=2 s, two
    unloaded urgent requests before."""
    rng = random.Random(seed)
    unloaded = [BenchRequest(f"unloaded-{i}", "interactive", 0, _text(rng), 16, t, (IMAGE,))
                for i, t in enumerate((0.0, 0.5))]
    low = [BenchRequest(f"low-{i}", "batch", 2, _text(rng), 256, 1.0, (IMAGE,))
           for i in range(48)]
    high = [BenchRequest(f"high-{i}", "interactive", 0, _text(rng), 16, 2.0, (IMAGE,))
            for i in range(8)]
    return unloaded + low + high


def long_workload(seed: int = 0) -> list[BenchRequest]:
    """32 batch requests of 1024 tokens over 2 s, 8 urgent ones every 0.5 s from 3 s."""
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


def side_figures(side: dict[str, Any]) -> dict[str, float | None]:
    high, unloaded = _ttfts(side, "high-"), _ttfts(side, "unloaded-")
    return {
        "urgent_ttft_p50_s": _r(percentile(high, 50)),
        "urgent_ttft_p99_s": _r(percentile(high, 99)),
        "unloaded_ttft_max_s": _r(max(unloaded)) if unloaded else None,
        "low_ttft_p50_s": _r(percentile(_ttfts(side, "low-"), 50)),
        # in-process: per request (vLLM 0.32 reports it); server: pio's counter
        "preemptions": side.get("preemptions") if side.get("preemptions") is not None
        else sum(c.get("preemptions") or 0 for c in (side.get("classes") or {}).values()),
    }


def figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The numbers the scenario is judged by, from one round (ratios within the round)."""
    plain, pio = side_figures(sides["plain"]), side_figures(sides["pio"])
    return {
        "urgent_ttft_p99_plain_over_pio": ratio(plain["urgent_ttft_p99_s"],
                                                pio["urgent_ttft_p99_s"]),
        "urgent_ttft_p50_plain_over_pio": ratio(plain["urgent_ttft_p50_s"],
                                                pio["urgent_ttft_p50_s"]),
        "pio_urgent_ttft_p99_over_unloaded": ratio(pio["urgent_ttft_p99_s"],
                                                   pio["unloaded_ttft_max_s"]),
        "throughput_pio_over_plain": ratio(sides["pio"]["output_tok_per_s"],
                                           sides["plain"]["output_tok_per_s"]),
        **{f"{name}_{key}": value for name, f in (("plain", plain), ("pio", pio))
           for key, value in f.items()},
        **_one_server_figures(sides, pio),
    }


ONE_SERVER = "pio-1api"  # with --api-server-count N: pio with one API server, same round


def _one_server_figures(sides: dict[str, dict[str, Any]],
                        pio: dict[str, float | None]) -> dict[str, float | None]:
    """With several API servers: pio's urgent p99 with one API server over its p99 with N
    (>= 1: N processes are no worse), and vLLM's peak running count on each side."""
    if ONE_SERVER not in sides:
        return {}
    one = side_figures(sides[ONE_SERVER])
    out: dict[str, float | None] = {
        "urgent_ttft_p99_one_server_over_pio": ratio(one["urgent_ttft_p99_s"],
                                                     pio["urgent_ttft_p99_s"]),
        "pio_1api_urgent_ttft_p99_s": one["urgent_ttft_p99_s"]}
    for name in ("plain", "pio", ONE_SERVER):
        peaks = sides[name].get("peak_running") or {}
        out[f"{name.replace('-', '_')}_peak_vllm_running"] = peaks.get("vllm_running")
    out["pio_peak_past_queue"] = (sides["pio"].get("peak_running") or {}).get("pio_past_queue")
    return out


def targets(workload: str, api_servers: int = 1) -> list[Target]:
    """The decided targets: 10x lower urgent p99 than plain and at most 4x pio's own
    unloaded TTFT (rendering on vLLM's one multimodal thread, 110-149 ms for 8 urgent
    renders on this machine, is the floor; 3x stays the GPU target), throughput no harm;
    with long requests in-process, 50x."""
    gain = 50.0 if workload == "long" else 10.0
    out = [Target(f"urgent p99 {gain:g}x lower", "urgent_ttft_p99_plain_over_pio", Kind.GAIN,
                  gain, f"urgent TTFT p99 plain/pio >= {gain:g}x (lower bound)")]
    if workload == "flood":
        out.append(Target("urgent p99 near unloaded", "pio_urgent_ttft_p99_over_unloaded",
                          Kind.AT_MOST, 4.0,
                          "pio's urgent TTFT p99 <= 4x its unloaded TTFT (upper bound)"))
    out.append(Target("throughput no harm", "throughput_pio_over_plain", Kind.NO_HARM, 0.97,
                      "throughput pio/plain >= 0.97x (median; lower bound >= 0.9)"))
    if api_servers > 1:
        out.append(Target(
            f"{api_servers} API servers no worse than one", "urgent_ttft_p99_one_server_over_pio",
            Kind.NO_HARM, 0.97, f"urgent TTFT p99 with 1 / with {api_servers} API servers "
            ">= 0.97x (median; lower bound >= 0.9)"))
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenarios import add_round_args

    ap = argparse.ArgumentParser(prog="pio-vllm bench priority-inversion",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["inproc", "server"], default="inproc")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="flood")
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    add_round_args(ap)
    ap.add_argument("--workload-seed", type=int, default=0)
    ap.add_argument("--api-server-count", type=int, default=1,
                    help="server mode: API-server processes on both sides (vLLM's "
                    "--api-server-count; pio admits across them in one order)")
    ap.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    if a.api_server_count != 1 and a.mode != "server":
        ap.error(f"--api-server-count {a.api_server_count} needs --mode server")
    api = "" if a.api_server_count == 1 else f"-{a.api_server_count}api"
    out = a.out or Path(
        f"benchmarks/results/priority-inversion-{a.workload}-{a.mode}{api}-cpu.json")
    work = WORKLOADS[a.workload](a.workload_seed)
    with tempfile.TemporaryDirectory() as tmp:
        engine = {} if a.api_server_count == 1 else {"api_server_count": a.api_server_count}
        config = str(derive_config(a.config, Path(tmp) / "inversion.yaml", engine=engine))
        sides = {"plain": ("plain", config), "pio": ("pio", config)}
        if a.api_server_count > 1:  # pio with one API server in the same rounds
            sides[ONE_SERVER] = ("pio", str(derive_config(a.config, Path(tmp) / "one.yaml")))
        rounds = run_rounds(sides, work, mode=a.mode, rounds=a.rounds, seed=a.seed,
                            sample_running=a.api_server_count > 1)
        report(f"priority-inversion-{a.workload}{api}", rounds, mode=a.mode,
               config=str(a.config), out=out, seed=a.seed, figures=figures,
               targets=targets(a.workload, a.api_server_count),
               extra={"command": command_line("priority-inversion", argv)},
               workload={"name": a.workload, "requests": len(work), "seed": a.workload_seed,
                         "description": WORKLOADS[a.workload].__doc__ or a.workload})
    return 0


if __name__ == "__main__":
    sys.exit(main())
