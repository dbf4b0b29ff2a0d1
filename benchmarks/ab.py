"""Generic A/B runner and report: sides x rounds, in-process or server mode.

A side is (kind, settings file): kind `plain` (vLLM's AsyncLLM / OpenAI server with the
file's engine arguments) or `pio` (PioEngine / `pio-vllm serve` with the whole file). A
round runs every side once, each in a fresh process (in-process mode) or against a fresh
server (server mode), on the same workload, in an order drawn from the record's seed
(benchmarks/protocol.py). The report is JSON (environment, every round's per-side summary
and per-request outcomes, the round's figures, each figure's median and 95% interval over
rounds, the scenario's verdicts), a markdown table and PNG plots.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BenchRequest,
    Slo,
    environment,
    ratio,
    run_side_subprocess,
    write_workload,
)
from benchmarks.protocol import (
    Target,
    interval_text,
    round_order,
    summaries,
    verdict_lines,
    verdicts,
)

# Rounds a record gets unless told otherwise (the protocol: committed records >= 5).
DEFAULT_ROUNDS = 3

SUMMARY_KEYS = (
    "requests", "ok", "wall_s", "output_tok_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tpot_p50_s", "tpot_p90_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s", "e2e_p50_s",
    "e2e_p99_s", "pio_intake_p50_s", "pio_intake_p99_s", "slo_met", "goodput_req_per_s",
    "shed", "expired", "shed_429", "errors", "classes", "tuning", "admission_capacity",
    "preemptions", "engine_preemptions", "admission_events", "step_model",
    "service_calibration", "ttft_prediction_error_p50", "server_timings", "peak_running",
)


@dataclass
class Round:
    """One round: every side's result (with per-request rows), in the order they ran."""

    index: int
    order: list[str]
    sides: dict[str, dict[str, Any]]


def run_rounds(sides: dict[str, tuple[str, str]], work: list[BenchRequest], *, mode: str,
               slo: Slo | None = None, concurrency: int | None = None,
               rounds: int = DEFAULT_ROUNDS, seed: int = 0, label: str = "",
               first_round: int = 0, sample_running: bool = False) -> list[Round]:
    """Run `rounds` rounds of every side on `work`; each round's order comes from `seed`
    (`first_round` numbers them when a scenario runs its rounds in several calls);
    `sample_running`: server mode, every side's /metrics sampled through the run
    (`server_mode.replay`), so no side carries the sampling's cost alone."""
    out: list[Round] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        wl = tmp / "workload.jsonl"
        write_workload(work, wl)
        for index in range(first_round, first_round + rounds):
            order = round_order(seed, index, list(sides))
            results: dict[str, dict[str, Any]] = {}
            for name in order:
                kind, config = sides[name]
                print(f"[round {index + 1}{label}] {name} ({mode}) ...", flush=True)
                if mode == "inproc":
                    results[name] = run_side_subprocess(
                        kind, config, wl, tmp / f"{name}{index}.json", slo, concurrency)
                else:
                    from benchmarks.server_mode import run_server_side

                    results[name] = run_server_side(kind, config, work, slo, concurrency, tmp,
                                                    sample_running=sample_running)
            # sides keep the scenario's order in the report; the run order is recorded
            out.append(Round(index, order, {name: results[name] for name in sides}))
    return out


def side_record(result: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps of one side of one round: its summary and per-request outcomes."""
    return {k: result.get(k) for k in SUMMARY_KEYS} | {"requests_detail": [
        {"id": row["request_id"], "class": row["priority_class"], "ok": row["ok"],
         "ttft_s": _r4(row.get("ttft_s")), "tpot_s": _r4(row.get("tpot_s")),
         "e2e_s": _r4(row.get("e2e_s")), "refused": refused(row)}
        for row in result.get("rows") or []]}


def refused(row: dict[str, Any]) -> bool:
    """pio refused the request (429 over HTTP, RequestRejectedError in-process)."""
    error = str(row.get("error"))
    return error.startswith("HTTP 429") or error.startswith("RequestRejectedError")


def lost_goodput(plain: dict[str, Any], pio: dict[str, Any], slo: Slo
                 ) -> dict[str, int] | None:
    """What plain vLLM made of the requests pio did not serve, matched by request id in the
    same round: met the SLO, served but missed it, or not served either. A request pio did
    not serve costs goodput only where plain met the SLO with it (`plain_met_slo`)."""
    theirs = {r["id"]: r for r in plain.get("requests_detail") or []}
    mine = pio.get("requests_detail") or []
    if not theirs or not mine:
        return None
    out = {"offered": len(mine), "not_served": 0, "plain_met_slo": 0, "plain_missed_slo": 0,
           "plain_not_served": 0}
    for r in mine:
        if r["ok"]:
            continue
        out["not_served"] += 1
        other = theirs[r["id"]]
        if not other["ok"]:
            out["plain_not_served"] += 1
        elif slo.met({"ok": True, "ttft_s": other["ttft_s"], "tpot_s": other["tpot_s"]}):
            out["plain_met_slo"] += 1
        else:
            out["plain_missed_slo"] += 1
    return out


def basic_figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Figures every two-sided scenario has: the second side over the first (throughput,
    goodput, SLO met) inside the round."""
    names = list(sides)
    if len(names) < 2:
        return {}
    base, other = sides[names[0]], sides[names[1]]
    key = f"{names[1]}_over_{names[0]}"
    return {
        f"throughput_{key}": ratio(other["output_tok_per_s"], base["output_tok_per_s"]),
        f"goodput_{key}": ratio(other.get("goodput_req_per_s"), base.get("goodput_req_per_s")),
    }


FigureFn = Callable[[dict[str, dict[str, Any]]], dict[str, float | None]]


def report(scenario: str, rounds: Sequence[Round], *, mode: str, config: str, out: Path,
           workload: dict[str, Any], slo: Slo | None = None, seed: int = 0,
           figures: FigureFn = basic_figures, targets: Sequence[Target] = (),
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write JSON, markdown and PNG plots; returns the JSON document. `figures` computes a
    round's figures from its side records; `targets` are judged on them."""
    from benchmarks.plots import plot_rounds, plot_runs

    out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    per_round: list[dict[str, float | None]] = []
    for r in rounds:
        sides = {name: side_record(res) for name, res in r.sides.items()}
        per_round.append(figures(sides))
        records.append({"round": r.index, "order": r.order, "sides": sides,
                        "figures": per_round[-1]})
    doc: dict[str, Any] = {
        "scenario": scenario, "mode": mode, "config": config, "workload": workload,
        "slo": None if slo is None else {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "seed": seed, "environment": environment(config), "rounds": records,
        **(extra or {}),
    }
    judge(doc, targets, per_round, seed)
    pngs = []
    if rounds and "pending" not in doc:
        last = rounds[-1]
        pngs += plot_runs(last.sides, out.with_suffix(""),
                          title=f"{scenario} ({mode}, round {last.index + 1})",
                          ttft_target_s=None if slo is None else slo.ttft_s)
        pngs += plot_rounds(doc, targets, out.with_suffix(""), title=f"{scenario} ({mode})")
    doc["plots"] = [p.name for p in pngs]
    write(doc, out, markdown(doc))
    return doc


def judge(doc: dict[str, Any], targets: Sequence[Target],
          per_round: Sequence[dict[str, float | None]], seed: int) -> None:
    """Set the record's figures (medians, intervals) and verdicts. Where scipy or matplotlib
    is not installed (the GPU machine's offline bundle has neither), the record keeps every
    round and its figures and says so in `pending`: `python -m benchmarks.rereport FILE`
    judges it and draws its plots where they are."""
    import importlib.util

    missing = [m for m in ("scipy", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        doc["figures"], doc["verdicts"] = {}, []
        doc["pending"] = (f"{' and '.join(missing)} not installed where this ran: run "
                          "`python -m benchmarks.rereport FILE` to add the intervals, "
                          "verdicts and plots")
        print(f"warning: {doc['pending']}", file=sys.stderr)
        return
    doc.pop("pending", None)
    doc["figures"] = summaries(per_round, seed)
    doc["verdicts"] = verdicts(targets, per_round, seed)


def command_line(scenario: str, argv: Sequence[str]) -> str:
    """The `pio-vllm bench` command that reproduces a record (its --out dropped)."""
    args = list(argv)
    if "--out" in args:
        i = args.index("--out")
        del args[i:i + 2]
    return " ".join(["pio-vllm bench", scenario, *[a for a in args if a != scenario]])


def write(doc: dict[str, Any], out: Path, table: str) -> None:
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}")


def _r4(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _or_dash(x: object) -> str:
    return "-" if x is None else str(x)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def environment_line(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    return (f"{env.get('device')}; vLLM {env.get('vllm')}, torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}; commit {env.get('git_commit')}")


def side_rows(records: Sequence[dict[str, Any]]) -> list[str]:
    """The per-round, per-side table (times in ms)."""
    lines = [
        "| round (order) | side | ok/sent | out tok/s | TTFT p50/p99 | TPOT p50/p99 | "
        "e2e p50 | met SLO | goodput req/s | refused/expired |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        for name, r in rec["sides"].items():
            shed = (r.get("shed") or 0) + (r.get("expired") or 0) + (r.get("shed_429") or 0)
            lines.append(
                f"| {rec['round'] + 1} ({' > '.join(rec['order'])}) | {name} | "
                f"{r['ok']}/{r['requests']} | {r['output_tok_per_s']} | "
                f"{_ms(r['ttft_p50_s'])}/{_ms(r['ttft_p99_s'])} | "
                f"{_ms(r['tpot_p50_s'])}/{_ms(r['tpot_p99_s'])} | {_ms(r['e2e_p50_s'])} | "
                f"{_or_dash(r.get('slo_met'))} | {_or_dash(r.get('goodput_req_per_s'))} | "
                f"{shed} |")
    return lines


def figure_lines(doc: dict[str, Any]) -> list[str]:
    """Each figure's median and 95% interval over rounds, and its per-round values."""
    lines = ["| figure | median [95% interval] | per round |", "|---|---|---|"]
    for name, s in doc["figures"].items():
        values = ", ".join("-" if v is None else f"{v:g}" for v in s["per_round"])
        lines.append(f"| {name} | {interval_text(s, '')} | {values} |")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# {doc['scenario']} ({doc['mode']})", "",
             f"{len(doc['rounds'])} rounds, side order drawn per round from seed "
             f"{doc['seed']}; {environment_line(doc)}. Times in ms.", ""]
    if doc["verdicts"]:
        lines += ["## Verdicts", "", *verdict_lines(doc["verdicts"]), ""]
    lines += ["## Figures (median over rounds, 95% bootstrap interval over rounds)", "",
              *figure_lines(doc), "", "## Rounds", "", *side_rows(doc["rounds"])]
    return "\n".join(lines)
