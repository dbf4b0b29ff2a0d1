"""`pio-vllm bench suite --profile NAME`: every scenario of a profile, with the protocol,
inside a time budget.

    pio-vllm bench suite --profile cpu-smoke|cpu|h100 [--budget-min M] [--out-dir DIR]
                         [--only SCENARIO,...] [--config FILE]

A profile is a list of steps, each a scenario's command line (benchmarks/scenarios.py) with
its rounds and sizes, and an estimate of its minutes on the machine the profile is for.
Steps run one after another; a step whose estimate no longer fits the budget is skipped
(and reported as such), never cut short: a half-run record has no interval. The suite writes
`suite-<profile>.json` (each step: command, status, wall time, result file, verdicts) and
`suite-<profile>.md` beside the scenarios' own results in --out-dir.

Profiles:
- `cpu-smoke`: the protocol end to end on the tiny model in about two minutes (the smoke
  scenario, two rounds); the test suite runs it.
- `cpu`: the committed records of benchmarks/results/ on a 2-core CPU machine (hours).
- `h100`: one GPU call of about 9 minutes with the 2B-shaped random-weight model
  (`pio:qwen3-vl-2b`) and configs/qwen3-vl-2b-instruct-h100.yaml, on vLLM 0.23 from the
  offline bundle (docs: GPU; ../shared/gpu/README.md): engine starts take 33-50 s there, so
  few rounds of short workloads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Step:
    """One scenario run: its name, `pio-vllm bench` arguments (without --out/--config) and
    the minutes it is expected to take on the profile's machine."""

    name: str
    argv: tuple[str, ...]
    minutes: float
    config: str | None = None  # the step's own settings file (None: the profile's)


@dataclass(frozen=True)
class Profile:
    name: str
    tag: str  # the results' file suffix: <step>-<tag>.json
    config: str
    budget_min: float
    steps: tuple[Step, ...]
    description: str


PROFILES = {
    "cpu-smoke": Profile(
        "cpu-smoke", "cpu-smoke", "configs/tiny-cpu.yaml", 5.0,
        (Step("smoke-inproc", ("smoke", "--mode", "inproc", "--rounds", "2"), 1.5),),
        "the protocol end to end on the tiny model (CI)"),
    "cpu": Profile(
        "cpu", "cpu", "configs/tiny-cpu.yaml", 480.0, (
            Step("priority-2b", ("priority-2b", "--rounds", "5"), 30,
                 config="configs/qwen3-vl-2b-instruct-cpu.yaml"),
            Step("priority-inversion-flood-server", (
                "priority-inversion", "--mode", "server", "--workload", "flood",
                "--rounds", "7"), 15),
            Step("burst-overload-server", (
                "burst-overload", "--mode", "server", "--rounds", "5"), 15),
            Step("mixed-resolution-inproc", (
                "mixed-resolution", "--mode", "inproc", "--rounds", "3"), 30),
            Step("burst-overload-inproc", (
                "burst-overload", "--mode", "inproc", "--rounds", "5"), 12),
            Step("priority-inversion-flood-inproc", (
                "priority-inversion", "--mode", "inproc", "--workload", "flood",
                "--rounds", "7"), 10),
            Step("overhead-server", ("overhead", "--mode", "server", "--rounds", "5"), 12),
            Step("overhead-inproc", ("overhead", "--mode", "inproc", "--rounds", "5"), 10),
            Step("priority-inversion-long-inproc", (
                "priority-inversion", "--mode", "inproc", "--workload", "long",
                "--rounds", "5"), 10),
            Step("mixed-resolution-server", (
                "mixed-resolution", "--mode", "server", "--rounds", "3"), 35),
            Step("image-flood-inproc", ("image-flood", "--mode", "inproc", "--rounds", "5"),
                 12),
            Step("router-overhead-server", (
                "router-overhead", "--mode", "server", "--rounds", "5"), 15),
        ), "the committed CPU records (2-core machine)"),
    "h100": Profile(
        "h100", "h100", "configs/qwen3-vl-2b-instruct-h100.yaml", 9.0, (
            Step("priority-inversion-flood-server", (
                "priority-inversion", "--mode", "server", "--workload", "flood",
                "--rounds", "2"), 4.0),
            Step("image-flood-inproc", ("image-flood", "--mode", "inproc", "--rounds", "1"),
                 2.0),
            Step("overhead-server", ("overhead", "--mode", "server", "--rounds", "1",
                                     "--quick"), 2.5),
        ), "one GPU call: the 2B-shaped model on an H100, vLLM 0.23"),
}


def step_out(out_dir: Path, profile: Profile, step: Step) -> Path:
    return out_dir / f"{step.name}-{profile.tag}.json"


def run_step(step: Step, config: str, out: Path) -> dict[str, Any]:
    """Run one step in this process; its record, or the failure."""
    from benchmarks.scenarios import main as bench_main

    started = time.monotonic()
    try:
        code = bench_main([*step.argv, "--config", config, "--out", str(out)])
        status = "ok" if code == 0 else f"exit {code}"
    except Exception as e:  # a failed step is reported; the others still run
        traceback.print_exc()
        status = f"failed: {type(e).__name__}: {e}"
    wall_min = round((time.monotonic() - started) / 60, 2)
    verdicts = json.loads(out.read_text()).get("verdicts") if out.is_file() else None
    return {"step": step.name, "argv": list(step.argv), "status": status,
            "wall_min": wall_min, "estimate_min": step.minutes,
            "result": out.name if out.is_file() else None, "verdicts": verdicts}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# bench suite: {doc['profile']}", "",
             f"{doc['description']}; config {doc['config']}; budget {doc['budget_min']} min, "
             f"used {doc['wall_min']} min.", "",
             "| step | status | minutes | targets met |", "|---|---|---|---|"]
    for s in doc["steps"]:
        verdicts = s.get("verdicts") or []
        met = f"{sum(v['met'] for v in verdicts)}/{len(verdicts)}" if verdicts else "-"
        result = f"[{s['step']}]({s['result']})" if s.get("result") else s["step"]
        lines.append(f"| {result} | {s['status']} | {s['wall_min']} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pio-vllm bench suite",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), required=True)
    ap.add_argument("--budget-min", type=float, default=None,
                    help="minutes the suite may take (default: the profile's)")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--only", default=None, help="comma-separated step names")
    ap.add_argument("--config", default=None, help="settings file (default: the profile's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    profile = PROFILES[a.profile]
    budget = profile.budget_min if a.budget_min is None else a.budget_min
    config = a.config or profile.config
    steps = list(profile.steps)
    if a.only:
        wanted = a.only.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            ap.error(f"--only {unknown}: profile {a.profile} has steps "
                     f"{[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
    a.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        used_min = (time.monotonic() - started) / 60
        if used_min + step.minutes > budget:
            print(f"[suite {i + 1}/{len(steps)}] skip {step.name}: {step.minutes} min "
                  f"does not fit the {budget - used_min:.1f} min left", flush=True)
            done.append({"step": step.name, "argv": list(step.argv), "status": "skipped",
                         "wall_min": 0.0, "estimate_min": step.minutes, "result": None,
                         "verdicts": None})
            continue
        print(f"[suite {i + 1}/{len(steps)}] {step.name} (about {step.minutes} min; "
              f"{budget - used_min:.1f} min left)", flush=True)
        done.append(run_step(step, step.config if a.config is None and step.config else config,
                             step_out(a.out_dir, profile, step)))
    doc = {"profile": profile.name, "description": profile.description, "config": config,
           "budget_min": budget, "wall_min": round((time.monotonic() - started) / 60, 2),
           "steps": done}
    out = a.out_dir / f"suite-{profile.name}.json"
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    failed = [s["step"] for s in done if s["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
