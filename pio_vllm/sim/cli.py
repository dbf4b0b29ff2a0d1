"""`pio-vllm simulate`: pio and plain vLLM on a modelled engine (the edge: it builds the
settings, the profile and the trace and hands them down).

    pio-vllm simulate --config FILE (--trace CSV | --scenario NAME) [--profile P]
                      [--replicas N | --replicas A..B] [--router round_robin]
                      [--mode server|inproc] [--slo TTFT,TPOT] [--goodput-target 0.9]
                      [--without MECHANISM,...] [--seed S] --json-out OUT

Writes OUT (JSON: `{"sides": {"plain": {...}, "pio": {...}}}` for one replica count, a
`runs` list for a range, with `fewest_replicas`: the fewest that serve at least the goodput
target's share of the requests within their SLO, for each side), OUT's .md table and, for a
range with matplotlib installed, a plot of goodput against replicas. The same inputs give
byte-identical JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pio_vllm.errors import ConfigError

# What `--without` switches off, each through its own setting.
MECHANISMS: dict[str, dict[str, dict[str, Any]]] = {
    "slo-admission": {"admission": {"slo_admission": False}},
    "preemption": {"admission": {"preemption": False}},
    "serve-late": {},  # every class sheds what it predicts to miss (below)
}


def without(settings: Any, names: list[str]) -> Any:
    """`settings` with the named mechanisms off."""
    unknown = sorted(set(names) - set(MECHANISMS))
    if unknown:
        raise ConfigError(f"--without {unknown}; accepted: {', '.join(MECHANISMS)}")
    for name in names:
        update: dict[str, Any] = {}
        for section, fields in MECHANISMS[name].items():
            update[section] = getattr(settings, section).model_copy(update=fields)
        if name == "serve-late":
            update["priority_classes"] = {
                k: c.model_copy(update={"infeasible": "shed"})
                for k, c in settings.priority_classes.items()}
        settings = settings.model_copy(update=update)
    return settings


def replica_range(text: str) -> list[int]:
    low, sep, high = text.partition("..")
    try:
        values = list(range(int(low), int(high) + 1)) if sep else [int(low)]
    except ValueError:
        raise ConfigError(f"--replicas {text!r}; accepted: N or A..B") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--replicas {text!r}; accepted: N or A..B with 1 <= A <= B")
    return values


def main(argv: list[str] | None = None) -> int:
    from pio_vllm.engine.vllm_backend import resolve_model
    from pio_vllm.settings import PioSettings
    from pio_vllm.sim.cluster import POLICIES, simulate
    from pio_vllm.sim.profile import load_profile, profile_for
    from pio_vllm.sim.report import class_slos, outcome_rows, summarise
    from pio_vllm.sim.trace import read_trace

    ap = argparse.ArgumentParser(prog="pio-vllm simulate", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="CSV: " + "arrival_s,class,prompt_tokens,"
                        "output_tokens,image_w,image_h")
    source.add_argument("--scenario", help="a bench scenario's workload (source checkout): "
                        "burst-overload, priority-inversion-flood, priority-inversion-long, "
                        "mixed-resolution:LOAD (LOAD x the capacity --capacity gives)")
    ap.add_argument("--capacity", type=float, default=None,
                    help="req/s of one replica, for mixed-resolution:LOAD")
    ap.add_argument("--profile", default=None, help="name in configs/profiles or a JSON path "
                    "(default: picked by the config's model and device)")
    ap.add_argument("--model", default=None, help="model path whose config vLLM reads "
                    "(default: the config's, pio:PRESET built locally)")
    ap.add_argument("--replicas", default="1", help="N, or A..B for a sweep")
    ap.add_argument("--router", default="round_robin", choices=POLICIES)
    ap.add_argument("--mode", default="server", choices=["server", "inproc"])
    ap.add_argument("--sides", default="plain,pio")
    ap.add_argument("--slo", default=None, help="TTFT,TPOT seconds for every class "
                    "(default: each class's own targets)")
    ap.add_argument("--goodput-target", type=float, default=0.9,
                    help="share of the requests that must meet their SLO (fewest replicas)")
    ap.add_argument("--without", default="", help="mechanisms to switch off on pio's side: "
                    + ", ".join(MECHANISMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path, required=True)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)

    settings = PioSettings.load(a.config)
    if a.without:
        settings = without(settings, [m for m in a.without.split(",") if m])
    import torch

    profile = load_profile(a.profile or profile_for(settings.model, torch.cuda.is_available()))
    model_path = a.model or resolve_model(settings)
    if a.trace is not None:
        rows = read_trace(a.trace, settings.priority_classes)
        trace_name = str(a.trace)
    else:
        rows = scenario_rows(a.scenario, a.capacity, model_path)
        trace_name = f"scenario {a.scenario}"
    slo = None
    if a.slo:
        try:
            ttft, tpot = (float(x) for x in a.slo.split(","))
        except ValueError:
            raise ConfigError(f"--slo {a.slo!r}; accepted: TTFT,TPOT in seconds") from None
        slo = (ttft, tpot)
    slos = class_slos(settings, slo)
    sides = [s for s in a.sides.split(",") if s]
    span = rows[-1].arrival_s - rows[0].arrival_s if rows else 0.0
    runs = []
    for n in replica_range(a.replicas):
        run: dict[str, Any] = {"replicas": n, "sides": {}}
        for side in sides:
            started = time.monotonic()
            result = simulate(settings, model_path, profile, rows, side=side, replicas=n,
                              policy=a.router, mode=a.mode, seed=a.seed)
            figures = summarise(outcome_rows(result.outcomes),
                                slos, span, result.wall_s)
            figures["engine_steps"] = result.steps
            figures["engine_busy_s"] = round(result.busy_s, 6)
            run["sides"][side] = figures
            print(f"replicas {n} {side}: served {figures['served']}/{figures['requests']}, "
                  f"met SLO {figures['met_slo']}, TTFT p50 {figures['ttft_p50_s']} s "
                  f"({time.monotonic() - started:.1f} s to simulate {result.steps} steps)",
                  file=sys.stderr, flush=True)
        runs.append(run)
    doc: dict[str, Any] = {
        "config": str(a.config), "profile": {"name": profile.name, "source": profile.source},
        "trace": {"name": trace_name, "requests": len(rows), "span_s": round(span, 6)},
        "router": a.router, "mode": a.mode, "seed": a.seed, "without": a.without or None,
        "goodput_target": a.goodput_target,
    }
    if len(runs) == 1:
        doc["replicas"] = runs[0]["replicas"]
        doc["sides"] = runs[0]["sides"]
    else:
        doc["runs"] = runs
        doc["fewest_replicas"] = {
            side: next((r["replicas"] for r in runs
                        if r["sides"][side]["met_slo"] >= a.goodput_target * len(rows)), None)
            for side in sides}
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    table = markdown(doc)
    print(table)
    if len(runs) > 1 and plot_sweep(doc, a.json_out.with_suffix(".png")):
        table += f"\n\n![share within SLO against replicas]({a.json_out.stem}.png)"
    a.json_out.with_suffix(".md").write_text(table + "\n")
    return 0


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# simulation: {doc['trace']['name']} ({doc['trace']['requests']} requests)", "",
             f"Profile {doc['profile']['name']} ({doc['profile']['source']}); router "
             f"{doc['router']}; mode {doc['mode']}; seed {doc['seed']}"
             + (f"; without {doc['without']}" if doc.get("without") else "") + ".", "",
             "| replicas | side | served | refused | met SLO | goodput req/s | TTFT p50 / p99 "
             "(s) |", "|---|---|---|---|---|---|---|"]
    runs = doc.get("runs") or [{"replicas": doc.get("replicas", 1), "sides": doc["sides"]}]
    for run in runs:
        for side, s in run["sides"].items():
            lines.append(f"| {run['replicas']} | {side} | {s['served']}/{s['requests']} | "
                         f"{s['refused']} | {s['met_slo']} | {s['goodput_req_s']} | "
                         f"{s['ttft_p50_s']} / {s['ttft_p99_s']} |")
    if "fewest_replicas" in doc:
        lines += ["", f"Fewest replicas serving {doc['goodput_target']:.0%} of the requests "
                  "within their SLO: " + ", ".join(
                      f"{side} {n if n is not None else 'more than tried'}"
                      for side, n in doc["fewest_replicas"].items()) + "."]
    return "\n".join(lines)


def plot_sweep(doc: dict[str, Any], path: Path) -> bool:
    """Whether a plot was written (it needs matplotlib: the bench extra)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    total = doc["trace"]["requests"]
    for side in doc["runs"][0]["sides"]:
        xs = [r["replicas"] for r in doc["runs"]]
        ys = [r["sides"][side]["met_slo"] / total for r in doc["runs"]]
        ax.plot(xs, ys, marker="o", label=side)
    ax.axhline(doc["goodput_target"], color="grey", linestyle="--", linewidth=1,
               label="target")
    ax.set_xlabel("replicas")
    ax.set_ylabel("share of requests within their SLO")
    ax.set_title(f"{doc['trace']['name']} ({doc['profile']['name']}, projection)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def scenario_rows(name: str, capacity: float | None, model_path: str) -> list[Any]:
    """A bench scenario's workload as trace rows (its generator, its seed): the source
    checkout's benchmarks/ package."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks" / "scenarios.py").is_file():
        raise ConfigError("--scenario needs the source checkout (benchmarks/); give --trace")
    sys.path.insert(0, str(root))
    from benchmarks.sim_workloads import scenario_trace

    return scenario_trace(name, capacity, model_path)


if __name__ == "__main__":
    sys.exit(main())
