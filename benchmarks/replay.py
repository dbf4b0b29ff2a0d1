"""`pio-vllm bench replay`: a simulator trace on the real engine, plain vLLM and pio, in the
shape `pio-vllm simulate` writes, so a simulated result can be checked against a real one.

    pio-vllm bench replay --config FILE --trace CSV [--mode inproc|server] [--rounds N]
                          --json-out OUT

Each side runs in a fresh process (in-process) or against a fresh server, with the same
engine arguments, in rounds whose order is drawn from --seed; `sides` holds each figure's
median over rounds and `rounds` every round's figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.ab import refused, run_rounds
from benchmarks.sim_workloads import from_trace
from pio_vllm.settings import PioSettings
from pio_vllm.sim.report import class_slos, summarise
from pio_vllm.sim.trace import read_trace


def side_figures(result: dict[str, Any], slos: Any, span_s: float) -> dict[str, Any]:
    rows = [{"class": r["priority_class"], "ok": r["ok"], "refused": refused(r),
             "expired": "DeadlineExceeded" in str(r.get("error")), "ttft_s": r.get("ttft_s"),
             "tpot_s": r.get("tpot_s")} for r in result["rows"]]
    return summarise(rows, slos, span_s, float(result["wall_s"]))


def medians(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over rounds (classes likewise)."""
    out: dict[str, Any] = {}
    for key, value in per_round[0].items():
        if isinstance(value, dict):
            out[key] = {k: medians([r[key][k] for r in per_round]) if isinstance(v, dict)
                        else v for k, v in value.items()}
        elif isinstance(value, int | float) or value is None:
            values = [r[key] for r in per_round if r[key] is not None]
            out[key] = round(statistics.median(values), 6) if values else None
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scenarios import add_round_args

    ap = argparse.ArgumentParser(prog="pio-vllm bench replay",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--trace", type=Path, required=True)
    ap.add_argument("--mode", choices=["inproc", "server"], default="inproc")
    add_round_args(ap)
    ap.add_argument("--json-out", type=Path, required=True)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    settings = PioSettings.load(a.config)
    rows = read_trace(a.trace, settings.priority_classes)
    levels = {name: c.level for name, c in settings.priority_classes.items()}
    work = from_trace(rows, levels)
    slos = class_slos(settings)
    span = rows[-1].arrival_s - rows[0].arrival_s if rows else 0.0
    rounds = run_rounds({"plain": ("plain", str(a.config)), "pio": ("pio", str(a.config))},
                        work, mode=a.mode, rounds=a.rounds, seed=a.seed)
    per_round = [{name: side_figures(res, slos, span) for name, res in r.sides.items()}
                 for r in rounds]
    doc = {"config": str(a.config), "trace": {"name": str(a.trace), "requests": len(rows),
                                              "span_s": round(span, 6)},
           "mode": a.mode, "seed": a.seed,
           "sides": {name: medians([r[name] for r in per_round]) for name in ("plain", "pio")},
           "rounds": [{"order": r.order, "sides": figs} for r, figs in
                      zip(rounds, per_round, strict=True)]}
    a.json_out.parent.mkdir(parents=True, exist_ok=True)
    a.json_out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(json.dumps(doc["sides"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
