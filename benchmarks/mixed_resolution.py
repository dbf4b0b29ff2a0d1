"""Scenario `mixed-resolution`: goodput under overload, at several multiples of capacity.

    pio-vllm bench mixed-resolution [--mode inproc|server] [--loads 0.8,1,1.5,3] [--n 150]
                                    [--rounds N] [--seed S]

The mix: a quarter text-only, a quarter each with one unique 224x224, 640x480 or 1344x1008
image, 32-128 output tokens (ignore_eos), one class (standard) with the SLO TTFT <= 3 s and
TPOT <= 60 ms; engine max_num_seqs 64. A calibration burst of 64 requests on plain vLLM (in
the same mode) measures capacity in requests/s; then, for each load, `--n` requests arrive
as a seeded Poisson process at load x capacity, replayed on plain vLLM and on pio (same
engine arguments; pio with its SLO admission, which the class's targets turn on). Goodput
is the requests that met both targets per second of the run; shed (429) and failed
requests count as not served. Reports per load: goodput, throughput, TTFT/TPOT, how pio's
admission decided (admitted at once, deferred in the queue, shed), its TTFT prediction
error (server mode: from the `x-pio-predicted-ttft-s` header; in-process: pio's metric),
and what plain made of each request pio did not serve. Every round runs every load, both
sides in an order drawn from --seed; the targets are judged on each figure's median and 95%
interval over rounds (benchmarks/protocol.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import (
    Round,
    command_line,
    environment_line,
    figure_lines,
    judge,
    lost_goodput,
    run_rounds,
    side_record,
    write,
)
from benchmarks.harness import BenchRequest, Slo, derive_config, environment, ratio
from benchmarks.plots import plot_rounds, plot_runs
from benchmarks.protocol import Kind, Target, floor_ratio, verdict_lines

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


def side_row(load: float, name: str, side: dict[str, Any]) -> dict[str, Any]:
    """The table's line of one side at one load in one round."""
    return {
        "load": load, "side": name, "sent": side["requests"], "ok": side["ok"],
        "slo_met": side.get("slo_met"), "goodput_req_per_s": side.get("goodput_req_per_s"),
        "output_tok_per_s": side["output_tok_per_s"], "ttft_p50_s": side["ttft_p50_s"],
        "ttft_p99_s": side["ttft_p99_s"], "tpot_p50_s": side["tpot_p50_s"],
        "tpot_p99_s": side["tpot_p99_s"],
        "shed": (side.get("shed") or 0) + (side.get("shed_429") or 0),
        "expired": side.get("expired") or 0,
        "admission": side.get("admission_events"),
        "ttft_prediction_error_p50": side.get("ttft_prediction_error_p50"),
    }


def load_key(load: float) -> str:
    return f"{load:g}x"


def round_figures(by_load: dict[float, dict[str, dict[str, Any]]]
                  ) -> dict[str, float | None]:
    """One round's figures at every load (ratios inside the round; pio's goodput at a load
    against its own at 1x of the same round)."""
    out: dict[str, float | None] = {}
    at_1x = by_load.get(1.0, {}).get("pio", {}).get("goodput_req_per_s")
    for load, sides in by_load.items():
        plain, pio, key = sides["plain"], sides["pio"], load_key(load)
        lost = lost_goodput(plain, pio, SLO)
        floor = 1.0 / plain["wall_s"] if plain.get("wall_s") else 0.0
        out[f"{key} goodput pio/plain"] = floor_ratio(
            pio.get("goodput_req_per_s"), plain.get("goodput_req_per_s"), floor)
        out[f"{key} throughput pio/plain"] = ratio(pio["output_tok_per_s"],
                                                   plain["output_tok_per_s"])
        out[f"{key} pio goodput / pio at 1x"] = ratio(pio.get("goodput_req_per_s"), at_1x)
        out[f"{key} TTFT prediction error p50"] = pio.get("ttft_prediction_error_p50")
        out[f"{key} lost goodput share"] = None if lost is None else round(
            lost["plain_met_slo"] / lost["offered"], 4)
    return out


def targets(loads: list[float]) -> list[Target]:
    """The decided targets (those whose load was run)."""
    out = []
    if 0.8 in loads:
        out += [Target("0.8x goodput no harm", "0.8x goodput pio/plain", Kind.NO_HARM, 0.97,
                       "0.8x: goodput pio/plain >= 0.97x (median; lower bound >= 0.9)"),
                Target("0.8x lost goodput", "0.8x lost goodput share", Kind.AT_MOST, 0.02,
                       "0.8x: requests pio did not serve that plain served within the SLO "
                       "<= 2% of those offered (upper bound)")]
    if 1.5 in loads:
        out.append(Target("1.5x goodput", "1.5x goodput pio/plain", Kind.GAIN, 1.5,
                          "1.5x: goodput pio/plain >= 1.5x (lower bound)"))
    if 3.0 in loads:
        out.append(Target("3x goodput", "3x goodput pio/plain", Kind.GAIN, 5.0,
                          "3x: goodput pio/plain >= 5x, plain's floored at one request per "
                          "run (lower bound)"))
        if 1.0 in loads:
            out.append(Target("3x keeps 1x goodput", "3x pio goodput / pio at 1x", Kind.GAIN,
                              0.7, "3x: pio's goodput >= 0.7x its own at 1x (lower bound)"))
    out += [Target(f"{load_key(load)} prediction error",
                   f"{load_key(load)} TTFT prediction error p50", Kind.AT_MOST, 0.30,
                   f"{load_key(load)}: pio's TTFT prediction error p50 <= 30% (upper bound)")
            for load in loads]
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# mixed-resolution ({doc['mode']})", "",
             f"Capacity {doc['capacity_req_per_s']} req/s (plain, burst of 64); SLO TTFT <= "
             f"{SLO.ttft_s} s, TPOT <= {SLO.tpot_s * 1000:.0f} ms; {len(doc['rounds'])} "
             f"rounds, side order drawn per round and load from seed {doc['seed']}; "
             f"{environment_line(doc)}.", ""]
    if doc["verdicts"]:
        lines += ["## Verdicts", "", *verdict_lines(doc["verdicts"]), ""]
    lines += ["## Figures (median over rounds, 95% bootstrap interval over rounds)", "",
              *figure_lines(doc), "", "## Rounds", "",
              "| round | load | side (order) | ok/sent | met SLO | goodput (req/s) | "
              "out tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | admitted / deferred "
              "/ refused | TTFT pred. error p50 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in doc["rounds"]:
        for load, at in rec["loads"].items():
            for r in at["rows"]:
                adm = r.get("admission") or {}
                decided = "-" if r["side"] == "plain" else (
                    f"{adm.get('admitted', '?')} / {adm.get('deferred', '?')} / "
                    f"{r['shed'] + r['expired']}")
                tp = [None if x is None else round(x * 1000, 1)
                      for x in (r["tpot_p50_s"], r["tpot_p99_s"])]
                err = r["ttft_prediction_error_p50"]
                position = at["order"].index(r["side"]) + 1
                lines.append(
                    f"| {rec['round'] + 1} | {load} | {r['side']} ({position}) | "
                    f"{r['ok']}/{r['sent']} | {r['slo_met']} | {r['goodput_req_per_s']} | "
                    f"{r['output_tok_per_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
                    f"{tp[0]} / {tp[1]} | {decided} | "
                    f"{'-' if err is None else f'{err:.0%}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenarios import add_round_args

    ap = argparse.ArgumentParser(prog="pio-vllm bench mixed-resolution",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["inproc", "server"], default="server")
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--loads", default="0.8,1,1.5,3", help="multiples of measured capacity")
    ap.add_argument("--n", type=int, default=150, help="requests per load")
    ap.add_argument("--workload-seed", type=int, default=0)
    add_round_args(ap)
    ap.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    out = a.out or Path(f"benchmarks/results/mixed-resolution-{a.mode}-cpu.json")
    loads = [float(x) for x in a.loads.split(",")]
    records: list[dict[str, Any]] = []
    last: dict[float, Round] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        config = str(scenario_config(a.config, Path(tmp_dir) / "mixed.yaml"))
        env = environment(config)  # reads the derived config: before it is deleted
        rng = random.Random(a.workload_seed + 1000)
        calibration = mixed_requests([0.0] * 64, rng)
        print(f"calibrating capacity on plain vLLM ({a.mode}, burst of 64) ...", flush=True)
        [cal] = run_rounds({"plain": ("plain", config)}, calibration, mode=a.mode, rounds=1,
                           label=", capacity")
        capacity = cal.sides["plain"]["ok"] / cal.sides["plain"]["wall_s"]
        print(f"capacity {capacity:.2f} req/s", flush=True)
        work = {}
        for load in loads:
            rng = random.Random(a.workload_seed)
            work[load] = mixed_requests(poisson(a.n, load * capacity, rng), rng)
        for index in range(a.rounds):
            by_load: dict[float, dict[str, dict[str, Any]]] = {}
            record: dict[str, Any] = {"round": index, "loads": {}}
            for li, load in enumerate(loads):
                print(f"round {index + 1}/{a.rounds}, load {load}x: {len(work[load])} "
                      f"requests at {load * capacity:.2f} req/s", flush=True)
                [done] = run_rounds({"plain": ("plain", config), "pio": ("pio", config)},
                                    work[load], mode=a.mode, slo=SLO, rounds=1,
                                    seed=a.seed * 1000 + li, first_round=index,
                                    label=f", load {load}x")
                last[load] = done
                done.sides["pio"]["ttft_prediction_error_p50"] = prediction_error_p50(
                    done.sides["pio"])
                sides = {name: side_record(res) for name, res in done.sides.items()}
                by_load[load] = sides
                record["loads"][load_key(load)] = {
                    "order": done.order, "sides": sides,
                    "rows": [side_row(load, name, res) for name, res in done.sides.items()]}
            record["figures"] = round_figures(by_load)
            records.append(record)
    per_round = [rec["figures"] for rec in records]
    chosen = targets(loads)
    doc: dict[str, Any] = {
        "scenario": "mixed-resolution", "mode": a.mode, "config": str(a.config),
        "seed": a.seed, "slo": {"ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s},
        "capacity_req_per_s": round(capacity, 3),
        "workload": {"requests_per_load": a.n, "loads": loads, "seed": a.workload_seed,
                     "mix": "1/4 text, 1/4 each one unique 224x224 / 640x480 / 1344x1008 "
                            "image; 32-128 output tokens; Poisson arrivals"},
        "environment": env, "rounds": records,
        "command": command_line("mixed-resolution", argv),
    }
    judge(doc, chosen, per_round, a.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = []
    if "pending" not in doc:
        for load, done in last.items():
            pngs += plot_runs(done.sides, out.with_name(f"{out.stem}-{load}x"),
                              title=f"mixed-resolution {load}x ({a.mode}, round "
                              f"{done.index + 1})", ttft_target_s=SLO.ttft_s)[:1]
        pngs += plot_rounds(doc, chosen, out.with_suffix(""),
                            title=f"mixed-resolution ({a.mode})")
    doc["plots"] = [p.name for p in pngs]
    write(doc, out, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
