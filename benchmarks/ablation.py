"""Scenario `ablation`: does one of pio's mechanisms earn its keep on a real engine?

    pio-vllm bench ablation --without MECHANISM [--workload W] [--rounds N] [--seed S]

The confirming real run that `pio-vllm simulate --without` asks for (docs/simulator.md,
"Ablation"). Two sides, both pio, in-process on the tiny model, in rounds whose order is
drawn from --seed (benchmarks/protocol.py): `pio` with every mechanism, and `without` with
MECHANISM switched off through the same setting the simulator switches
(`pio_vllm.sim.cli.MECHANISMS`). The workload is a bench scenario's own (generator and seed)
with its settings; by default the one on which the simulator's ablation table shows the
mechanism's effect:

| mechanism | workload | figure the simulator moves |
|---|---|---|
| slo-admission | mixed-resolution:3 | requests within the SLO |
| preemption | priority-inversion-flood | the top class's TTFT p99 |
| serve-late | burst-overload | requests served |

Target: the mechanism helps, i.e. the figure with it over the figure without it (for a
TTFT, without over with) has a 95% interval whose lower bound is above 1. A mechanism whose
record does not meet it is deleted: the step budget and cheap-first ordering went so (their
records, made before, are benchmarks/results/ablation-step-budget-*.md and
ablation-cheap-first-*.md; docs/simulator.md, "Ablation").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.ab import command_line, report, run_rounds
from benchmarks.harness import BenchRequest, Slo, derive_config, ratio
from benchmarks.protocol import Kind, Target, floor_ratio
from pio_vllm.admission.metrics import percentile

RESULTS = Path("benchmarks/results")
BASE = Path("configs/tiny-cpu.yaml")

# mechanism -> (default workload, the figure it is judged by)
DEFAULTS: dict[str, tuple[str, str]] = {
    "slo-admission": ("mixed-resolution:3", "met_slo"),
    "preemption": ("priority-inversion-flood", "top_ttft_p99_s"),
    "serve-late": ("burst-overload", "served"),
}
FIGURE_TEXT = {"met_slo": "requests within the SLO, with / without",
               "top_ttft_p99_s": "top class TTFT p99, without / with",
               "served": "requests served, with / without"}


def config_without(base: Path, out: Path, mechanism: str) -> Path:
    """`base` (a settings YAML) with `mechanism` switched off: the same settings as
    `pio-vllm simulate --without MECHANISM`."""
    import yaml

    from pio_vllm.sim.cli import MECHANISMS

    config = yaml.safe_load(base.read_text())
    for section, fields in MECHANISMS[mechanism].items():
        config[section] = {**(config.get(section) or {}), **fields}
    if mechanism == "serve-late":  # every class sheds what it predicts to miss
        for cls in (config.get("priority_classes") or {}).values():
            cls["infeasible"] = "shed"
    out.write_text(yaml.safe_dump(config))
    return out


def workload(name: str, tmp: Path) -> tuple[Path, list[BenchRequest], Slo | None]:
    """The scenario's settings file, requests and SLO (None: the scenario has none)."""
    from benchmarks.sim_workloads import recorded_burst, recorded_capacity, scenario_work

    if name.startswith("mixed-resolution:"):
        from benchmarks.mixed_resolution import SLO, scenario_config

        return (scenario_config(BASE, tmp / "mixed.yaml"),
                scenario_work(name, recorded_capacity()), SLO)
    if name == "burst-overload":
        s = recorded_burst(BASE, tmp)
        return Path(s["sides"]["pio"][1]), s["work"], s["slo"]
    if name == "priority-inversion-flood":
        return derive_config(BASE, tmp / "flood.yaml"), scenario_work(name, None), None
    raise SystemExit(f"--workload {name!r}; accepted: mixed-resolution:LOAD, burst-overload, "
                     "priority-inversion-flood")


def side_figures(side: dict[str, Any], top: str) -> dict[str, float | None]:
    """What a side made of the workload: requests within the SLO, served, and the top
    class's TTFT p99 over its served requests (its unloaded reference requests left out)
    beside how many of them were not served."""
    rows = [r for r in side["requests_detail"]
            if r["class"] == top and not r["id"].startswith("unloaded-")]
    served = [r["ttft_s"] for r in rows if r["ok"] and r["ttft_s"] is not None]
    return {"met_slo": side.get("slo_met"), "served": float(side["ok"]),
            "top_ttft_p99_s": percentile(served, 99),
            "top_not_served": float(len(rows) - len(served)),
            "output_tok_per_s": side["output_tok_per_s"]}


def figures_for(top: str):
    def figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        with_, without = side_figures(sides["pio"], top), side_figures(sides["without"], top)
        out = {f"{name} {k}": v for name, fig in (("pio", with_), ("without", without))
               for k, v in fig.items()}
        out["met_slo with/without"] = floor_ratio(with_["met_slo"], without["met_slo"], 1.0)
        out["served with/without"] = ratio(with_["served"], without["served"])
        out["top_ttft_p99_s without/with"] = ratio(without["top_ttft_p99_s"],
                                                  with_["top_ttft_p99_s"])
        out["throughput with/without"] = ratio(with_["output_tok_per_s"],
                                               without["output_tok_per_s"])
        return out
    return figures


def targets(mechanism: str, figure: str) -> list[Target]:
    """The one verdict: the mechanism helps on its figure (lower bound above 1)."""
    key = {"met_slo": "met_slo with/without", "served": "served with/without",
           "top_ttft_p99_s": "top_ttft_p99_s without/with"}[figure]
    return [Target(f"{mechanism} helps", key, Kind.GAIN, 1.0,
                   f"{mechanism} helps: {FIGURE_TEXT[figure]} > 1 (lower bound)")]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenarios import add_round_args
    from pio_vllm.sim.cli import MECHANISMS

    ap = argparse.ArgumentParser(prog="pio-vllm bench ablation",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--without", required=True, choices=sorted(MECHANISMS))
    ap.add_argument("--workload", default=None,
                    help="mixed-resolution:LOAD, burst-overload or priority-inversion-flood "
                    "(default: the mechanism's, module docstring)")
    ap.add_argument("--figure", choices=sorted(FIGURE_TEXT), default=None,
                    help="the figure judged (default: the mechanism's)")
    add_round_args(ap)
    ap.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    name = a.workload or DEFAULTS[a.without][0]
    figure = a.figure or DEFAULTS[a.without][1]
    if figure == "met_slo" and name == "priority-inversion-flood":
        raise SystemExit("--figure met_slo: priority-inversion-flood has no SLO; accepted: "
                         "served, top_ttft_p99_s")
    slug = name.replace(":", "-").replace(".", "_")
    out = a.out or RESULTS / f"ablation-{a.without}-{slug}-inproc-cpu.json"
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        config, work, slo = workload(name, tmp)
        off = config_without(config, tmp / "without.yaml", a.without)
        top = min(work, key=lambda r: r.level).priority_class
        rounds = run_rounds({"pio": ("pio", str(config)), "without": ("pio", str(off))},
                            work, mode="inproc", slo=slo, rounds=a.rounds, seed=a.seed)
        report("ablation", rounds, mode="inproc", config=str(config), out=out, slo=slo,
               seed=a.seed, figures=figures_for(top), targets=targets(a.without, figure),
               extra={"command": command_line("ablation", argv)},
               workload={"mechanism": a.without, "name": name, "figure": figure,
                         "requests": len(work), "top_class": top})
    return 0


if __name__ == "__main__":
    sys.exit(main())
