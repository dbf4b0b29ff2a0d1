"""Scenario `mixed-resolution`: Poisson arrivals at ~1.2x capacity of text, small and large images.

    python -m benchmarks.mixed_resolution [--config configs/tiny-cpu.yaml] [--duration-s 30]

First a calibration burst on plain vLLM measures the engine's capacity (requests/s for this
mix); then a seeded workload arrives as a Poisson process at `--load` (1.2) times that rate
for `--duration-s`: 40% text-only, 40% one small image (224-448 px sides), 20% one large
image (1344x1008, 1008x1344 or 1280x720), 64 output tokens each (ignore_eos), all of one
class. Three sides replay the same requests, each in a fresh process with the same engine
arguments: plain vLLM (static max_num_seqs / max_num_batched_tokens), pio with tuning off
(admission with the class's queue wait bounded by the TTFT target), and pio with tuning on
(BatchLimitScheduler, TPOT target = the SLO's). Goodput counts requests that meet both the
TTFT and the TPOT target, per second of the run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import (
    BenchRequest,
    Slo,
    environment,
    ratio,
    run_side_subprocess,
    write_workload,
)

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light")
LARGE = ((1344, 1008), (1008, 1344), (1280, 720))
SIDES = ("plain", "pio-untuned", "pio-tuned")


def mixed_requests(n: int, rng: random.Random, arrivals: list[float],
                   max_tokens: int = 64) -> list[BenchRequest]:
    out = []
    for i in range(n):
        text = "describe " + " ".join(rng.choice(WORDS) for _ in range(10))
        kind = rng.random()
        images: tuple[tuple[int, int, int], ...] = ()
        if kind >= 0.4:
            if kind < 0.8:
                size = (rng.randint(224, 448), rng.randint(224, 448))
            else:
                size = rng.choice(LARGE)
            images = ((size[0], size[1], rng.randrange(1 << 30)),)
        out.append(BenchRequest(f"r{i}", "standard", 1, text, max_tokens,
                                round(arrivals[i], 4), images))
    return out


def calibration_workload(seed: int, n: int = 64) -> list[BenchRequest]:
    return mixed_requests(n, random.Random(seed + 1000), [0.0] * n)


def poisson_workload(seed: int, rate_per_s: float, duration_s: float) -> list[BenchRequest]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t > duration_s:
            break
        arrivals.append(t)
    return mixed_requests(len(arrivals), rng, arrivals)


def side_config(base: Path, side: str, slo: Slo, out: Path) -> Path:
    config = yaml.safe_load(base.read_text())
    classes = config.setdefault("priority_classes", {
        "interactive": {"level": 0, "max_queue_len": 64, "weight": 4.0},
        "standard": {"level": 1, "max_queue_len": 256, "weight": 2.0},
        "batch": {"level": 2, "max_queue_len": 1024, "weight": 1.0},
    })
    # pio's admission: a request that cannot start within the TTFT target leaves the queue
    # (it would miss its SLO anyway) instead of delaying the ones behind it.
    classes["standard"] = {**classes.get("standard", {"level": 1}),
                           "max_queue_wait_s": slo.ttft_s}
    config["tuning"] = {**config.get("tuning", {}), "enabled": side == "pio-tuned",
                        "tpot_target_s": slo.tpot_s}
    out.write_text(yaml.safe_dump(config))
    return out


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("requests", "ok", "wall_s", "output_tok_per_s", "ttft_p50_s", "ttft_p99_s",
            "tpot_p50_s", "tpot_p99_s", "slo_met", "goodput_req_per_s", "shed", "expired",
            "admission_capacity", "tuning", "errors")
    return {k: r.get(k) for k in keep}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| side | done/sent | out tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | "
             "met SLO | goodput (req/s) | shed+expired |", "|---|---|---|---|---|---|---|---|"]
    for side in SIDES:
        r = result["sides"][side]
        tp50 = None if r["tpot_p50_s"] is None else round(r["tpot_p50_s"] * 1000, 1)
        tp99 = None if r["tpot_p99_s"] is None else round(r["tpot_p99_s"] * 1000, 1)
        dropped = (r.get("shed") or 0) + (r.get("expired") or 0)
        lines.append(f"| {side} | {r['ok']}/{r['requests']} | {r['output_tok_per_s']} | "
                     f"{r['ttft_p50_s']} / {r['ttft_p99_s']} | {tp50} / {tp99} | "
                     f"{r['slo_met']} | {r['goodput_req_per_s']} | {dropped} |")
    for side in SIDES[1:]:
        c = result["ratios"][side]
        lines.append(f"| {side} / plain | | {c['throughput']}x | | | | {c['goodput']}x | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--load", type=float, default=1.2, help="arrival rate / measured capacity")
    ap.add_argument("--slo-ttft-s", type=float, default=2.0)
    ap.add_argument("--slo-tpot-s", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/mixed-resolution-cpu.json"))
    a = ap.parse_args(argv)
    slo = Slo(a.slo_ttft_s, a.slo_tpot_s)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        configs = {s: str(side_config(a.config, s, slo, tmp / f"{s}.yaml")) for s in SIDES}
        calib = tmp / "calibration.jsonl"
        write_workload(calibration_workload(a.seed), calib)
        print("calibrating capacity on plain vLLM (burst of 64 mixed requests) ...", flush=True)
        cal = run_side_subprocess("plain", configs["plain"], calib, tmp / "cal.json")
        capacity = cal["ok"] / cal["wall_s"]
        rate = a.load * capacity
        work = poisson_workload(a.seed, rate, a.duration_s)
        print(f"capacity {capacity:.2f} req/s -> Poisson {rate:.2f} req/s for "
              f"{a.duration_s:.0f} s: {len(work)} requests", flush=True)
        wl = tmp / "workload.jsonl"
        write_workload(work, wl)
        sides = {}
        for side in SIDES:
            kind = "plain" if side == "plain" else "pio"
            sides[side] = summary_row(run_side_subprocess(
                kind, configs[side], wl, tmp / f"{side}.json", slo))
    plain = sides["plain"]
    result = {
        "scenario": "mixed-resolution", "config": str(a.config), "seed": a.seed,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "capacity_req_per_s": round(capacity, 3), "arrival_rate_req_per_s": round(rate, 3),
        "workload": {"requests": len(work), "duration_s": a.duration_s,
                     "mix": "40% text, 40% one 224-448 px image, 20% one large image; "
                            "64 output tokens"},
        "environment": environment(str(a.config)),
        "sides": sides,
        "ratios": {side: {
            "goodput": ratio(sides[side]["goodput_req_per_s"], plain["goodput_req_per_s"]),
            "throughput": ratio(sides[side]["output_tok_per_s"], plain["output_tok_per_s"]),
        } for side in SIDES[1:]},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    a.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
