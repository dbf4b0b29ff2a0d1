"""Which of pio's mechanisms earn their keep: the simulator with each one switched off.

    python -m benchmarks.sim_ablation [--profile tiny-cpu]
                                      [--out benchmarks/results/sim-ablation-cpu.json]

On the bench scenarios' own workloads (mixed-resolution at 1.5x and 3x capacity,
burst-overload, the priority-inversion flood; in-process, the tiny model's settings), pio is
simulated with all its mechanisms, then with each of `pio-vllm simulate --without`'s
mechanisms off in turn, beside plain vLLM. A row's figures: requests that met the SLO (the
scenario's own), requests served, and the TTFT p99 of the top class. A mechanism whose
removal changes nothing on any workload is a candidate for deletion; one confirming real run
(`pio-vllm bench`) decides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import Slo, derive_config
from benchmarks.sim_workloads import scenario_work, to_trace
from pio_vllm.settings import PioSettings
from pio_vllm.sim.cli import MECHANISMS, without
from pio_vllm.sim.cluster import simulate
from pio_vllm.sim.profile import load_profile
from pio_vllm.sim.report import Slo as SimSlo
from pio_vllm.sim.report import outcome_rows, summarise

RESULTS = Path("benchmarks/results")


def run_variants(name: str, settings: PioSettings, model: str, profile: Any,
                 work: list[Any], slo: Slo | None) -> list[dict[str, Any]]:
    rows = to_trace(work, model)
    slos = {c: SimSlo(slo.ttft_s, slo.tpot_s) if slo else SimSlo(None, None)
            for c in settings.priority_classes}
    present = {r.priority_class for r in rows}
    top = min(present, key=lambda c: settings.priority_classes[c].level)
    variants: list[tuple[str, str, PioSettings]] = [("plain", "plain", settings),
                                                   ("pio", "pio", settings)]
    variants += [(f"pio without {m}", "pio", without(settings, [m])) for m in MECHANISMS]
    out = []
    for label, side, s in variants:
        print(f"{name}: {label} ...", file=sys.stderr, flush=True)
        result = simulate(s, model, profile, rows, side=side, mode="inproc", seed=0)
        figures = summarise(outcome_rows(result.outcomes), slos, 0.0, result.wall_s)
        top_fig = figures["classes"].get(top, {})
        out.append({"workload": name, "variant": label, "requests": figures["requests"],
                    "served": figures["served"], "refused": figures["refused"],
                    "met_slo": figures["met_slo"] if slo else None,
                    "top_class": top, "top_ttft_p99_s": top_fig.get("ttft_p99_s"),
                    "wall_s": figures["wall_s"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_ablation",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny-cpu")
    ap.add_argument("--capacity", type=float, default=None,
                    help="in-process req/s for mixed-resolution (default: its record's)")
    ap.add_argument("--out", type=Path, default=RESULTS / "sim-ablation-cpu.json")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from benchmarks.mixed_resolution import SLO as MIXED_SLO
    from benchmarks.mixed_resolution import scenario_config
    from benchmarks.sim_workloads import recorded_burst, recorded_capacity
    from pio_vllm.engine.vllm_backend import resolve_model

    profile = load_profile(a.profile)
    base = Path("configs/tiny-cpu.yaml")
    model = resolve_model(PioSettings.load(base))
    capacity = a.capacity if a.capacity is not None else recorded_capacity()
    table: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        mixed = PioSettings.load(scenario_config(base, Path(tmp) / "mixed.yaml"))
        for load in (1.5, 3.0):
            table += run_variants(f"mixed-resolution {load:g}x", mixed, model, profile,
                                  scenario_work(f"mixed-resolution:{load}", capacity),
                                  MIXED_SLO)
        s = recorded_burst(base, Path(tmp))
        table += run_variants("burst-overload", PioSettings.load(s["sides"]["pio"][1]), model,
                              profile, s["work"], s["slo"])
        flood = PioSettings.load(derive_config(base, Path(tmp) / "flood.yaml"))
        table += run_variants("priority-inversion flood", flood, model, profile,
                              scenario_work("priority-inversion-flood", None), None)
    doc = {"profile": {"name": profile.name, "source": profile.source},
           "mixed_resolution_capacity_req_per_s": capacity, "rows": table}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Ablation in the simulator ({profile.name})", "",
             "One seeded in-process run per row; met SLO uses the scenario's own SLO (the "
             "flood has none: its figure is the top class's TTFT p99).", "",
             "| workload | variant | served | refused | met SLO | top class TTFT p99 (s) |",
             "|---|---|---|---|---|---|"]
    for r in table:
        met = "-" if r["met_slo"] is None else r["met_slo"]
        lines.append(f"| {r['workload']} | {r['variant']} | {r['served']}/{r['requests']} | "
                     f"{r['refused']} | {met} | {r['top_ttft_p99_s']} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
