"""Generic A/B runner and report: sides x repeats (alternating), in-process or server mode.

A side is (kind, settings file): kind `plain` (vLLM's AsyncLLM / OpenAI server with the
file's engine arguments) or `pio` (PioEngine / `pio-vllm serve` with the whole file). Each
side runs in a fresh process (in-process mode) or against a fresh server (server mode), in
the order A B A B ... when repeated. The report is JSON (environment, every run's summary,
ratios against the first side), a markdown table and PNG plots.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BenchRequest,
    Slo,
    environment,
    ratio,
    ratio_text,
    run_side_subprocess,
    write_workload,
)

SUMMARY_KEYS = (
    "requests", "ok", "wall_s", "output_tok_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tpot_p50_s", "tpot_p90_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s",
    "e2e_p99_s", "pio_intake_p50_s", "pio_intake_p99_s", "slo_met", "goodput_req_per_s",
    "shed", "expired", "shed_429", "errors", "classes", "tuning", "admission_capacity",
    "preemptions", "engine_preemptions", "admission_events", "step_model",
    "service_calibration", "ttft_prediction_error_p50",
)


def run_ab(sides: dict[str, tuple[str, str]], work: list[BenchRequest], *, mode: str,
           slo: Slo | None = None, concurrency: int | None = None,
           repeats: int = 1) -> list[dict[str, dict[str, Any]]]:
    """Runs of every side (with per-request rows), repeat by repeat."""
    runs: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        wl = tmp / "workload.jsonl"
        write_workload(work, wl)
        for rep in range(repeats):
            run: dict[str, dict[str, Any]] = {}
            for name, (kind, config) in sides.items():
                print(f"[{rep + 1}/{repeats}] {name} ({mode}) ...", flush=True)
                if mode == "inproc":
                    run[name] = run_side_subprocess(kind, config, wl, tmp / f"{name}{rep}.json",
                                                    slo, concurrency)
                else:
                    from benchmarks.server_mode import run_server_side

                    run[name] = run_server_side(kind, config, work, slo, concurrency, tmp)
            runs.append(run)
    return runs


def report(scenario: str, runs: list[dict[str, dict[str, Any]]], *, mode: str,
           config: str, out: Path, workload: dict[str, Any],
           slo: Slo | None = None) -> dict[str, Any]:
    """Write JSON, markdown and PNG plots; returns the JSON document."""
    from benchmarks.plots import plot_runs

    base = next(iter(runs[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = plot_runs(runs[-1], out.with_suffix(""), title=f"{scenario} ({mode})",
                     ttft_target_s=None if slo is None else slo.ttft_s)
    doc = {
        "scenario": scenario, "mode": mode, "config": config, "workload": workload,
        "slo": None if slo is None else {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "environment": environment(config),
        "runs": [{name: {k: r.get(k) for k in SUMMARY_KEYS} | {"requests_detail": [
            {"id": row["request_id"], "class": row["priority_class"], "ok": row["ok"],
             "ttft_s": _r4(row.get("ttft_s")), "e2e_s": _r4(row.get("e2e_s"))}
            for row in r.get("rows") or []]} for name, r in run.items()} for run in runs],
        "ratios": [{name: {
            "throughput": ratio(r["output_tok_per_s"], run[base]["output_tok_per_s"]),
            "goodput": ratio(r.get("goodput_req_per_s"), run[base].get("goodput_req_per_s")),
        } for name, r in run.items() if name != base} for run in runs],
        "plots": [p.name for p in pngs],
    }
    out.write_text(json.dumps(doc, indent=1))
    table = markdown(doc)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}, " + ", ".join(str(p) for p in pngs))
    return doc


def _r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _or_dash(x: object) -> str:
    return "-" if x is None else str(x)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['scenario']} ({doc['mode']}); times in ms",
        "",
        "| run | side | ok/sent | out tok/s | TTFT p50/p99 | TPOT p50/p99 | ITL p99 | "
        "e2e p50 | met SLO | goodput req/s | shed | pio intake p50 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(doc["runs"]):
        for name, r in run.items():
            shed = (r.get("shed") or 0) + (r.get("expired") or 0) + (r.get("shed_429") or 0)
            lines.append(
                f"| {i} | {name} | {r['ok']}/{r['requests']} | {r['output_tok_per_s']} | "
                f"{_ms(r['ttft_p50_s'])}/{_ms(r['ttft_p99_s'])} | "
                f"{_ms(r['tpot_p50_s'])}/{_ms(r['tpot_p99_s'])} | {_ms(r['itl_p99_s'])} | "
                f"{_ms(r['e2e_p50_s'])} | {_or_dash(r.get('slo_met'))} | "
                f"{_or_dash(r.get('goodput_req_per_s'))} | {shed} | "
                f"{_ms(r.get('pio_intake_p50_s'))} |")
        for name, c in doc["ratios"][i].items():
            lines.append(f"| {i} | {name} / {next(iter(run))} | | "
                         f"{ratio_text(c['throughput'])} | | | | | "
                         f"| {ratio_text(c['goodput'])} | | |")
    return "\n".join(lines)
