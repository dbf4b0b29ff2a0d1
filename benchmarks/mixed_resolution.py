"""Scenario `mixed-resolution`: goodput under overload, at several multiples of capacity.

    pio-vllm bench mixed-resolution [--mode inproc|server] [--loads 0.8,1,1.5,3] [--n 150]

The mix: a quarter text-only, a quarter each with one unique 224x224, 640x480 or 1344x1008
image, 32-128 output tokens (ignore_eos), one class (standard) with the SLO TTFT <= 3 s and
TPOT <= 60 ms; engine max_num_seqs 64. A calibration burst of 64 requests on plain vLLM (in
the same mode) measures capacity in requests/s; then, for each load, `--n` requests arrive
as a seeded Poisson process at load x capacity, replayed on plain vLLM and on pio (same
engine arguments; pio with its SLO admission, which the class's targets turn on). Goodput
is the requests that met both targets per second of the run; shed (429) and failed
requests count as not served. Reports per load: goodput, throughput, TTFT/TPOT, how pio's
admission decided (admitted at once, deferred in the queue, shed), and its TTFT prediction
error (server mode: from the `x-pio-predicted-ttft-s` header; in-process: pio's metric).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import run_ab
from benchmarks.harness import (
    BenchRequest,
    Slo,
    derive_config,
    environment,
    ratio,
    ratio_text,
)
from benchmarks.plots import plot_runs

WORDS = ("the", "red", "car", "blue", "sky", "cat", "dog", "tree", "house", "street", "light")
SIZES: tuple[tuple[int, int] | None, ...] = (None, (224, 224), (640, 480), (1344, 1008))
SLO = Slo(ttft_s=3.0, tpot_s=0.06)


def mixed_requests(arrivals: list[float], rng: random.Random) -> list[BenchRequest]:
    out = []
    for i, t in enumerate(arrivals):
        text = "describe " + " ".join(rng.choice(WORDS) for _ in range(10))
        size = rng.choice(SIZES)
        images = () if size is None else ((size[0], size[1], rng.randrange(1 << 30)),)
        out.append(BenchRequest(f"r{i}", "standard", 1, text, rng.randint(32, 128),
                                round(t, 4), images))
    return out


def poisson(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        arrivals.append(t)
    return arrivals


def scenario_config(base: Path, out: Path) -> Path:
    """The shared engine arguments (max_num_seqs 64) and the class's SLO."""
    return derive_config(base, out, engine={"max_num_seqs": 64},
                         priority_classes={
                             "interactive": {"level": 0, "max_queue_len": 256, "weight": 4.0,
                                             "ttft_target_s": 1.0, "tpot_target_s": SLO.tpot_s},
                             "standard": {"level": 1, "max_queue_len": 512, "weight": 2.0,
                                          "ttft_target_s": SLO.ttft_s,
                                          "tpot_target_s": SLO.tpot_s},
                             "batch": {"level": 2, "max_queue_len": 1024, "weight": 1.0}})


def prediction_error_p50(side: dict[str, Any]) -> float | None:
    errors = sorted(abs(r["predicted_ttft_s"] - r["ttft_s"]) / r["ttft_s"]
                    for r in side.get("rows") or []
                    if r.get("predicted_ttft_s") and r.get("ttft_s"))
    if side.get("ttft_prediction_error_p50") is not None:  # in-process: pio's own metric
        return float(side["ttft_prediction_error_p50"])
    if not errors:
        return None
    from pio_vllm.admission.metrics import percentile

    return percentile(errors, 50)


def row(load: float, name: str, side: dict[str, Any]) -> dict[str, Any]:
    return {
        "load": load, "side": name, "sent": side["requests"], "ok": side["ok"],
        "slo_met": side.get("slo_met"), "goodput_req_per_s": side.get("goodput_req_per_s"),
        "output_tok_per_s": side["output_tok_per_s"], "ttft_p50_s": side["ttft_p50_s"],
        "ttft_p99_s": side["ttft_p99_s"], "tpot_p50_s": side["tpot_p50_s"],
        "tpot_p99_s": side["tpot_p99_s"],
        "shed": (side.get("shed") or 0) + (side.get("shed_429") or 0),
        "expired": side.get("expired") or 0,
        "admission": side.get("admission_events"),
        "ttft_prediction_error_p50": None if name == "plain" else prediction_error_p50(side),
        "step_model": side.get("step_model"),
        "service_calibration": side.get("service_calibration"),
    }


def not_served_by_pio(plain: dict[str, Any], pio: dict[str, Any]) -> dict[str, int] | None:
    """What plain vLLM made of the requests pio did not serve (refused, expired or failed),
    matched by request id in the same workload: met the SLO, served but missed it, or not
    served either. It says whether pio's refusals cost goodput or only throughput."""
    plain_rows = {r["request_id"]: r for r in plain.get("rows") or []}
    if not plain_rows or not pio.get("rows"):
        return None
    out = {"requests": 0, "plain_met_slo": 0, "plain_missed_slo": 0, "plain_not_served": 0}
    for r in pio["rows"]:
        if r["ok"]:
            continue
        theirs = plain_rows[r["request_id"]]
        out["requests"] += 1
        key = ("plain_met_slo" if SLO.met(theirs) else "plain_missed_slo") if theirs["ok"] \
            else "plain_not_served"
        out[key] += 1
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"mixed-resolution ({doc['mode']}); capacity {doc['capacity_req_per_s']} req/s "
             f"(plain, burst); SLO TTFT <= {SLO.ttft_s} s, TPOT <= {SLO.tpot_s * 1000:.0f} ms",
             "",
             "| load | side | ok/sent | met SLO | goodput (req/s) | out tok/s | "
             "TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | admitted / deferred / shed | "
             "TTFT pred. error p50 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        adm = r.get("admission") or {}
        decided = "-" if r["side"] == "plain" else (
            f"{adm.get('admitted', '?')} / {adm.get('deferred', '?')} / "
            f"{r['shed'] + r['expired']}")
        tp = [None if x is None else round(x * 1000, 1) for x in (r["tpot_p50_s"],
                                                                  r["tpot_p99_s"])]
        err = r["ttft_prediction_error_p50"]
        lines.append(
            f"| {r['load']}x | {r['side']} | {r['ok']}/{r['sent']} | {r['slo_met']} | "
            f"{r['goodput_req_per_s']} | {r['output_tok_per_s']} | {r['ttft_p50_s']} / "
            f"{r['ttft_p99_s']} | {tp[0]} / {tp[1]} | {decided} | "
            f"{'-' if err is None else f'{err:.0%}'} |")
    lines += ["", "| load | pio / plain goodput | pio / plain throughput | "
              "pio goodput / pio at 1x | not served by pio: plain met SLO / missed / not "
              "served |", "|---|---|---|---|---|"]
    for c in doc["ratios"]:
        ns = c.get("not_served_by_pio")
        fate = "-" if ns is None else (f"{ns['requests']}: {ns['plain_met_slo']} / "
                                       f"{ns['plain_missed_slo']} / {ns['plain_not_served']}")
        lines.append(f"| {c['load']}x | {ratio_text(c['goodput'], '- (plain 0)')} | "
                     f"{ratio_text(c['throughput'])} | "
                     f"{c['pio_over_pio_at_1x']} | {fate} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pio-vllm bench mixed-resolution",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["inproc", "server"], default="server")
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--loads", default="0.8,1,1.5,3", help="multiples of measured capacity")
    ap.add_argument("--n", type=int, default=150, help="requests per load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    out = a.out or Path(f"benchmarks/results/mixed-resolution-{a.mode}-cpu.json")
    loads = [float(x) for x in a.loads.split(",")]
    rows: list[dict[str, Any]] = []
    fates: dict[float, dict[str, int] | None] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        config = str(scenario_config(a.config, Path(tmp_dir) / "mixed.yaml"))
        env = environment(config)  # reads the derived config: before it is deleted
        rng = random.Random(a.seed + 1000)
        calibration = mixed_requests([0.0] * 64, rng)
        print(f"calibrating capacity on plain vLLM ({a.mode}, burst of 64) ...", flush=True)
        [cal] = run_ab({"plain": ("plain", config)}, calibration, mode=a.mode)
        capacity = cal["plain"]["ok"] / cal["plain"]["wall_s"]
        print(f"capacity {capacity:.2f} req/s", flush=True)
        pngs = []
        for load in loads:
            rng = random.Random(a.seed)
            work = mixed_requests(poisson(a.n, load * capacity, rng), rng)
            print(f"load {load}x: {len(work)} requests at {load * capacity:.2f} req/s",
                  flush=True)
            [run] = run_ab({"plain": ("plain", config), "pio": ("pio", config)}, work,
                           mode=a.mode, slo=SLO)
            rows += [row(load, name, side) for name, side in run.items()]
            fates[load] = not_served_by_pio(run["plain"], run["pio"])
            out.parent.mkdir(parents=True, exist_ok=True)
            pngs += plot_runs(run, out.with_name(f"{out.stem}-{load}x"),
                              title=f"mixed-resolution {load}x ({a.mode})",
                              ttft_target_s=SLO.ttft_s)[:1]
    by = {(r["load"], r["side"]): r for r in rows}
    at_1x = by.get((1.0, "pio"), {}).get("goodput_req_per_s")
    doc = {
        "scenario": "mixed-resolution", "mode": a.mode, "config": str(a.config),
        "seed": a.seed, "slo": {"ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s},
        "capacity_req_per_s": round(capacity, 3),
        "workload": {"requests_per_load": a.n, "loads": loads,
                     "mix": "1/4 text, 1/4 each one unique 224x224 / 640x480 / 1344x1008 "
                            "image; 32-128 output tokens; Poisson arrivals"},
        "environment": env, "rows": rows,
        "ratios": [{
            "load": load,
            "goodput": ratio(by[(load, "pio")]["goodput_req_per_s"],
                             by[(load, "plain")]["goodput_req_per_s"]),
            "throughput": ratio(by[(load, "pio")]["output_tok_per_s"],
                                by[(load, "plain")]["output_tok_per_s"]),
            "pio_over_pio_at_1x": ratio(by[(load, "pio")]["goodput_req_per_s"], at_1x),
            "not_served_by_pio": fates[load],
        } for load in loads],
        "plots": [p.name for p in pngs],
    }
    out.write_text(json.dumps(doc, indent=1))
    table = markdown(doc)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
