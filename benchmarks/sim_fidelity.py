"""Simulated against real: the simulator on the workloads of the committed in-process records.

    python -m benchmarks.sim_fidelity [--profile tiny-cpu]
                                      [--out benchmarks/results/sim-fidelity-cpu.json]

For each record (mixed-resolution at 0.8x, 1.5x and 3x, burst-overload, the priority-
inversion flood; in-process; and the `pio-vllm bench replay` record of the cpu-mix trace,
benchmarks/results/replay-cpu-mix-inproc-cpu.json), the same workload (generator and
seed, or trace) and the same settings are simulated for plain vLLM and pio, and compared
with the median over the record's rounds: goodput within 15% (or within 2% of the offered
rate where the real goodput is near 0), TTFT p50 within 20%, p99 within 30%, and the
pio/plain goodput ratio on the same side of 1. The result is a table; nothing is tuned to fit it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import Slo, derive_config
from benchmarks.sim_workloads import scenario_work, to_trace
from pio_vllm.settings import PioSettings
from pio_vllm.sim.cluster import simulate
from pio_vllm.sim.profile import load_profile
from pio_vllm.sim.report import Slo as SimSlo
from pio_vllm.sim.report import outcome_rows, summarise

RESULTS = Path("benchmarks/results")
TOLERANCE = {"goodput": 0.15, "ttft_p50_s": 0.20, "ttft_p99_s": 0.30}


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs), 6) if xs else None


def real_sides(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per side, the median over rounds of goodput and TTFT p50/p99 (a round's side record)."""
    out = {}
    for side in ("plain", "pio"):
        recs = [r["sides"][side] for r in rounds]
        out[side] = {"goodput": _median([r.get("goodput_req_per_s") for r in recs]),
                     "ttft_p50_s": _median([r.get("ttft_p50_s") for r in recs]),
                     "ttft_p99_s": _median([r.get("ttft_p99_s") for r in recs])}
    return out


def sim_sides(settings: PioSettings, model: str, profile: Any, work: list[Any],
              slo: Slo | None) -> dict[str, dict[str, float | None]]:
    rows = to_trace(work, model)
    slos = {name: SimSlo(slo.ttft_s, slo.tpot_s) if slo else SimSlo(None, None)
            for name in settings.priority_classes}
    out = {}
    for side in ("plain", "pio"):
        result = simulate(settings, model, profile, rows, side=side, mode="inproc", seed=0)
        figures = summarise(outcome_rows(result.outcomes), slos, 0.0, result.wall_s)
        out[side] = {"goodput": figures["goodput_req_per_wall_s"] if slo else None,
                     "ttft_p50_s": figures["ttft_p50_s"], "ttft_p99_s": figures["ttft_p99_s"]}
    return out


def compare(name: str, real: dict[str, Any], sim: dict[str, Any], offered_per_s: float
            ) -> list[dict[str, Any]]:
    rows = []
    for side in ("plain", "pio"):
        for metric, tolerance in TOLERANCE.items():
            r, s = real[side][metric], sim[side][metric]
            if r is None or s is None:
                continue
            error = abs(s - r) / r if r > 0 else None
            near_zero = metric == "goodput" and r < 0.05 * offered_per_s
            within = (abs(s - r) <= 0.02 * offered_per_s) if near_zero else (
                error is not None and error <= tolerance)
            rows.append({"workload": name, "side": side, "metric": metric, "real": r,
                         "simulated": s, "error": None if error is None else round(error, 3),
                         "target": "within 2% of offered" if near_zero else
                         f"within {tolerance:.0%}", "within": within})
    rp, rq = real["pio"]["goodput"], real["plain"]["goodput"]
    sp, sq = sim["pio"]["goodput"], sim["plain"]["goodput"]
    if None not in (rp, rq, sp, sq):
        same = (rp >= rq) == (sp >= sq)
        rows.append({"workload": name, "side": "pio/plain", "metric": "goodput ratio side of 1",
                     "real": round(rp / rq, 3) if rq else None,
                     "simulated": round(sp / sq, 3) if sq else None, "error": None,
                     "target": "same side of 1", "within": same})
    return rows


def replay_rows(doc: dict[str, Any], model: str, profile: Any) -> list[dict[str, Any]]:
    """A `pio-vllm bench replay` record (medians over its rounds) against the simulation of
    the same trace and settings: goodput per second of the trace's span and TTFT p50/p99,
    each class's own SLO."""
    from pio_vllm.sim.report import class_slos
    from pio_vllm.sim.trace import read_trace

    settings = PioSettings.load(Path(doc["config"]))
    rows = read_trace(Path(doc["trace"]["name"]), settings.priority_classes)
    span = float(doc["trace"]["span_s"])
    slos = class_slos(settings)
    real, sim = {}, {}
    for side in ("plain", "pio"):
        r = doc["sides"][side]
        real[side] = {"goodput": r["goodput_req_s"], "ttft_p50_s": r["ttft_p50_s"],
                      "ttft_p99_s": r["ttft_p99_s"]}
        result = simulate(settings, model, profile, rows, side=side, mode=doc["mode"], seed=0)
        f = summarise(outcome_rows(result.outcomes), slos, span, result.wall_s)
        sim[side] = {"goodput": f["goodput_req_s"], "ttft_p50_s": f["ttft_p50_s"],
                     "ttft_p99_s": f["ttft_p99_s"]}
    name = f"trace {Path(doc['trace']['name']).stem} (bench replay)"
    return compare(name, real, sim, len(rows) / span)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_fidelity",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim-fidelity-cpu.json")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from benchmarks.mixed_resolution import SLO as MIXED_SLO
    from benchmarks.mixed_resolution import scenario_config
    from pio_vllm.engine.vllm_backend import resolve_model

    profile = load_profile(a.profile)
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path("configs/tiny-cpu.yaml")
        model = resolve_model(PioSettings.load(base))
        mixed = RESULTS / "mixed-resolution-inproc-cpu.json"
        if mixed.is_file():
            doc = json.loads(mixed.read_text())
            settings = PioSettings.load(scenario_config(base, Path(tmp) / "mixed.yaml"))
            capacity = float(doc["capacity_req_per_s"])
            for load in (0.8, 1.5, 3.0):
                key = f"{load:g}x"
                rounds = [r["loads"][key] for r in doc["rounds"] if key in r["loads"]]
                if not rounds:
                    continue
                work = scenario_work(f"mixed-resolution:{load}", capacity)
                print(f"mixed-resolution {key} ...", file=sys.stderr, flush=True)
                table += compare(f"mixed-resolution {key}", real_sides(rounds),
                                 sim_sides(settings, model, profile, work, MIXED_SLO),
                                 load * capacity)
        burst = RESULTS / "burst-overload-inproc-cpu.json"
        if burst.is_file():
            from benchmarks.sim_workloads import recorded_burst

            s = recorded_burst(base, Path(tmp))
            settings = PioSettings.load(s["sides"]["pio"][1])
            doc = json.loads(burst.read_text())
            work = s["work"]
            print("burst-overload ...", file=sys.stderr, flush=True)
            table += compare("burst-overload", real_sides(doc["rounds"]),
                             sim_sides(settings, model, profile, work, s["slo"]),
                             len(work) / 2.0)
        flood = RESULTS / "priority-inversion-flood-inproc-cpu.json"
        if flood.is_file():
            settings = PioSettings.load(derive_config(base, Path(tmp) / "flood.yaml"))
            doc = json.loads(flood.read_text())
            print("priority-inversion flood ...", file=sys.stderr, flush=True)
            table += compare("priority-inversion flood", real_sides(doc["rounds"]),
                             sim_sides(settings, model, profile,
                                       scenario_work("priority-inversion-flood", None), None),
                             1.0)
        replay = RESULTS / "replay-cpu-mix-inproc-cpu.json"
        if replay.is_file():
            print("trace cpu-mix (bench replay) ...", file=sys.stderr, flush=True)
            table += replay_rows(json.loads(replay.read_text()), model, profile)
    within = sum(r["within"] for r in table)
    doc_out = {"profile": {"name": profile.name, "source": profile.source},
               "tolerance": TOLERANCE, "rows": table,
               "within": f"{within}/{len(table)}"}
    a.out.write_text(json.dumps(doc_out, indent=1) + "\n")
    lines = [f"# Simulator fidelity ({profile.name})", "",
             f"{within} of {len(table)} comparisons within their targets; real = median over "
             "the record's rounds (in-process), simulated = one seeded run.", "",
             "| workload | side | metric | real | simulated | error | target | within |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        error = "-" if r["error"] is None else f"{r['error']:.0%}"
        lines.append(f"| {r['workload']} | {r['side']} | {r['metric']} | {r['real']} | "
                     f"{r['simulated']} | {error} | {r['target']} | "
                     f"{'yes' if r['within'] else '**no**'} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
