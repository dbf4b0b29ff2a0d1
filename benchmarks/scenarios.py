"""`pio-vllm bench SCENARIO`: the named A/B scenarios against plain vLLM.

    pio-vllm bench overhead [--mode inproc|server] [--rounds N] [--seed S] [--config FILE]
                            [--preset qwen3-vl-2b] [--out benchmarks/results/...]

- `overhead`: saturating closed loop (concurrency 2 x max_num_seqs), one class, every request
  a 448x336 image and 64 tokens: what pio's layer costs. Target: pio >= 0.98x throughput.
- `burst-overload`: a burst 3x what plain vLLM serves within the 2 s TTFT target out of a
  probe burst of 120 (measured first, in the same mode; 20% interactive, 80% batch): plain
  vLLM queues everything; pio's SLO admission serves
  first what it predicts meets the SLO, sheds the interactive requests that cannot (429 +
  Retry-After) and serves such batch requests late (`infeasible: serve_late`). Reports
  SLO met per side.
- `priority-inversion`, `mixed-resolution`, `priority-2b` (the 2B architecture: interactive
  requests behind batch image prefills), `ablation` (pio with and without one of its
  mechanisms): their own modules.
- `image-flood`: a Poisson flood of unique low-priority images (up to 1344x1008) with
  interactive requests arriving during it; the first two arrive before the flood (their
  TTFT is the unloaded reference).
- `router-overhead` (server mode): the overhead workload against one replica directly and
  through vllm-router (`serve-replicas --replicas 1`). Target: >= 0.97x direct.
- `smoke`: 10 requests, the CI check that both modes run end to end.
- `suite --profile cpu-smoke|cpu|h100`: a profile's scenarios with the protocol, inside a
  time budget (benchmarks/suite.py).
- `calibrate --out PROFILE.json`: a simulator profile fitted from a real engine's steps.
- `replay --trace CSV`: a simulator trace on the real engine, plain and pio.

Each side runs in a fresh process with the same engine arguments, every round in an order
drawn from --seed; each scenario judges its targets on the median and 95% interval of its
figures over rounds (benchmarks/protocol.py). Results go to
benchmarks/results/<scenario>-<mode>-<device>.{json,md,png} unless --out is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from benchmarks.ab import (
    DEFAULT_ROUNDS,
    basic_figures,
    command_line,
    lost_goodput,
    report,
    run_rounds,
)
from benchmarks.harness import Slo, derive_config, ratio
from benchmarks.protocol import Kind, Target, floor_ratio
from benchmarks.workload import WorkloadSpec, generate

NO_HARM = Target("throughput no harm", "throughput_pio_over_plain", Kind.NO_HARM, 0.98,
                 "throughput pio/plain >= 0.98x (median; lower bound >= 0.9)")
ROUTER_NO_HARM = Target("router hop no harm", "throughput_router_over_direct", Kind.NO_HARM,
                        0.97, "throughput through vllm-router / direct >= 0.97x")
BURST_TARGETS = [
    Target("SLO met", "slo_met_pio_over_plain", Kind.GAIN, 1.2,
           "requests meeting the SLO pio/plain >= 1.2x (lower bound)"),
    Target("lost goodput", "lost_goodput_share", Kind.AT_MOST, 0.05,
           "requests pio did not serve that plain served within the SLO <= 5% of those "
           "offered (upper bound)")]


def _derive(base: Path, out: Path, preset: str | None, **sections: Any) -> str:
    if preset:
        sections["engine"] = {**sections.get("engine", {}), "model": f"pio:{preset}"}
    return str(derive_config(base, out, **sections))


def overhead(base: Path, tmp: Path, preset: str | None, quick: bool) -> dict[str, Any]:
    config = yaml.safe_load(base.read_text())
    seqs = int(config["engine"].get("max_num_seqs", 8))
    # 384 requests: on a fast day 96 took 4 s a side, shorter than its noise
    spec = WorkloadSpec(n=24 if quick else 384, arrival="closed", concurrency=2 * seqs,
                        images_per_request={1: 1.0}, image_sizes={"448x336": 1.0},
                        output_tokens=(64, 64))
    path = _derive(base, tmp / "overhead.yaml", preset)
    return {"sides": {"plain": ("plain", path), "pio": ("pio", path)},
            "work": generate(spec), "concurrency": spec.concurrency, "slo": None,
            "workload": {"spec": repr(spec)}, "targets": [NO_HARM]}


def router_overhead(base: Path, tmp: Path, preset: str | None, quick: bool
                    ) -> dict[str, Any]:
    """The overhead workload against one `pio-vllm serve` replica directly and through
    vllm-router (`serve-replicas --replicas 1`, round_robin: vllm-router's power_of_two
    needs two workers): what the router hop costs (server mode)."""
    s = overhead(base, tmp, preset, quick)
    path = s["sides"]["pio"][1]
    return s | {"sides": {"direct": ("pio", path), "router": ("pio-router", path)},
                "server_only": True, "targets": [ROUTER_NO_HARM]}


# Requests of the burst-overload mix plain vLLM gets as a burst to measure how many it serves
# within the SLO; the recorded burst is OVERLOAD times that.
CAPACITY_PROBE = 120
OVERLOAD = 3.0


def burst_overload(base: Path, tmp: Path, preset: str | None, quick: bool) -> dict[str, Any]:
    """A burst about 3x what the engine serves within the TTFT target: sized from a probe
    burst on plain vLLM (`size_by_capacity`; a fixed size was no overload on a faster day:
    plain met the SLO on half of 120)."""
    slo = Slo(ttft_s=2.0, tpot_s=0.1)
    spec = WorkloadSpec(n=40 if quick else 120, arrival="burst",
                        classes={"interactive": 0.2, "batch": 0.8},
                        images_per_request={0: 0.5, 1: 0.5}, image_sizes={"448x336": 1.0},
                        output_tokens=(64, 64))
    # Every request has the scenario's SLO, so each class carries it: pio's SLO admission
    # lets work into the engine at the rate that keeps the TPOT target and decides at
    # arrival what it predicts would miss the TTFT target. Interactive and standard refuse
    # it at once (429 + Retry-After: the client may go elsewhere); batch serves it late,
    # behind all work that can still meet the SLO, so nothing of it is lost. The queue
    # bounds are the whole burst: the SLO decides, not a hand-sized queue.
    targets = {"ttft_target_s": slo.ttft_s, "tpot_target_s": slo.tpot_s}
    refuse = {**targets, "max_queue_wait_s": slo.ttft_s}
    classes = {
        "interactive": {"level": 0, "max_queue_len": 1024, "weight": 4.0, **refuse},
        "standard": {"level": 1, "max_queue_len": 1024, "weight": 2.0, **refuse},
        "batch": {"level": 2, "max_queue_len": 1024, "weight": 1.0, **targets,
                  "infeasible": "serve_late"},
    }
    path = _derive(base, tmp / "burst.yaml", preset, priority_classes=classes)

    def figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        plain, pio = sides["plain"], sides["pio"]
        lost = lost_goodput(plain, pio, slo)
        return basic_figures(sides) | {
            # plain meeting none counts as one: the ratio stays finite (and conservative)
            "slo_met_pio_over_plain": floor_ratio(pio.get("slo_met"), plain.get("slo_met"),
                                                  1.0),
            "lost_goodput_share": None if lost is None else round(
                lost["plain_met_slo"] / lost["offered"], 4),
            "refused_by_pio": None if lost is None else lost["not_served"],
        }

    def sized(n: int) -> list[Any]:
        return generate(replace(spec, n=n))

    return {"sides": {"plain": ("plain", path), "pio": ("pio", path)},
            "work": sized(spec.n), "concurrency": None, "slo": slo,
            "workload": {"spec": repr(spec)}, "figures": figures, "targets": BURST_TARGETS,
            "size_by_capacity": None if quick else sized}


def image_flood(base: Path, tmp: Path, preset: str | None, quick: bool) -> dict[str, Any]:
    """Unique low-priority images arrive as a flood; interactive requests arrive during it.
    The first two interactive requests (t=0, 0.4 s) come before the flood: their TTFT is the
    unloaded reference."""
    import random

    from benchmarks.harness import BenchRequest

    rng = random.Random(0)
    n_low = 16 if quick else 48
    work = [BenchRequest(f"hi-{i}", "interactive", 0, "what is in the picture", 16, t,
                         ((224, 224, rng.randrange(1 << 30)),))
            for i, t in enumerate([0.0, 0.4, *(2.0 + k for k in range(8))])]
    t = 1.0
    for i in range(n_low):
        size = rng.choice([(448, 336), (448, 336), (640, 480), (1344, 1008)])
        work.append(BenchRequest(f"lo-{i}", "batch", 2, "describe the image in detail", 32,
                                 round(t, 3), ((size[0], size[1], rng.randrange(1 << 30)),)))
        t += rng.expovariate(4.0)
    path = _derive(base, tmp / "flood.yaml", preset)

    def figures(sides: dict[str, dict[str, Any]]) -> dict[str, float | None]:
        def p99(side: dict[str, Any]) -> float | None:
            from pio_vllm.admission.metrics import percentile

            ttfts = [r["ttft_s"] if r["ok"] and r["ttft_s"] is not None else float("inf")
                     for r in side["requests_detail"]
                     if r["class"] == "interactive" and r["id"] not in ("hi-0", "hi-1")]
            return percentile(ttfts, 99)

        return basic_figures(sides) | {
            "urgent_ttft_p99_plain_over_pio": ratio(p99(sides["plain"]), p99(sides["pio"]))}

    return {"sides": {"plain": ("plain", path), "pio": ("pio", path)}, "work": work,
            "figures": figures, "targets": [NO_HARM],
            "concurrency": None, "slo": Slo(ttft_s=1.0, tpot_s=0.2),
            "workload": {"high": "10 interactive (224x224 image, 16 tokens): t=0, 0.4 "
                                 "(unloaded), then every 1 s from 2 s",
                         "low": f"{n_low} batch unique images (448x336 .. 1344x1008, 32 "
                                "tokens), Poisson 4/s from 1 s"}}


SMOKE = WorkloadSpec(n=10, arrival="poisson", rate_per_s=20.0,
                     classes={"interactive": 0.3, "batch": 0.7},
                     images_per_request={0: 0.5, 1: 0.5}, image_sizes={"320x240": 1.0},
                     output_tokens=(8, 16))


def smoke(base: Path, tmp: Path, preset: str | None, quick: bool) -> dict[str, Any]:
    spec = SMOKE
    path = _derive(base, tmp / "smoke.yaml", preset)
    return {"sides": {"plain": ("plain", path), "pio": ("pio", path)},
            "work": generate(spec), "concurrency": None, "slo": Slo(5.0, 0.5),
            "workload": {"spec": repr(spec)}, "targets": [NO_HARM]}


GENERIC: dict[str, Callable[..., dict[str, Any]]] = {
    "overhead": overhead, "burst-overload": burst_overload, "image-flood": image_flood,
    "router-overhead": router_overhead, "smoke": smoke}
OWN_MODULES = {"priority-inversion": "benchmarks.priority_inversion",
               "ablation": "benchmarks.ablation",
               "mixed-resolution": "benchmarks.mixed_resolution",
               "priority-2b": "benchmarks.priority_2b",
               "suite": "benchmarks.suite",
               "calibrate": "benchmarks.calibrate",
               "replay": "benchmarks.replay"}


def targets_of(doc: dict[str, Any]) -> list[Target]:
    """A record's targets, from its scenario (what `benchmarks.rereport` judges it by)."""
    scenario = doc["scenario"]
    if scenario.startswith("priority-inversion-"):
        from benchmarks.priority_inversion import targets

        return targets(scenario.removeprefix("priority-inversion-"))
    if scenario == "mixed-resolution":
        from benchmarks.mixed_resolution import targets as mixed

        return mixed([float(x) for x in doc["workload"]["loads"]])
    if scenario == "ablation":
        from benchmarks.ablation import targets as ablation

        return ablation(doc["workload"]["mechanism"], doc["workload"]["figure"])
    if scenario == "priority-2b":
        from benchmarks.priority_2b import TARGETS

        return list(TARGETS)
    return {"burst-overload": BURST_TARGETS, "router-overhead": [ROUTER_NO_HARM]}.get(
        scenario, [NO_HARM])


def _device_tag() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = sorted([*GENERIC, *OWN_MODULES])
    if argv and argv[0] in OWN_MODULES:
        import importlib

        module = importlib.import_module(OWN_MODULES[argv[0]])
        return int(module.main(argv[1:]) or 0)
    ap = argparse.ArgumentParser(prog="pio-vllm bench", description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=names)
    ap.add_argument("--mode", choices=["inproc", "server"], default="inproc")
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--preset", default=None, help="pio:PRESET model instead of the config's")
    add_round_args(ap)
    ap.add_argument("--quick", action="store_true", help="fewer requests")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    out = a.out or Path(f"benchmarks/results/{a.scenario}-{a.mode}-{_device_tag()}.json")
    with tempfile.TemporaryDirectory() as tmp:
        s = GENERIC[a.scenario](a.config, Path(tmp), a.preset, a.quick)
        if s.get("server_only") and a.mode != "server":
            ap.error(f"{a.scenario} runs in server mode only (--mode server)")
        if s.get("size_by_capacity") is not None:
            size_by_capacity(s, a.mode)
        rounds = run_rounds(s["sides"], s["work"], mode=a.mode, slo=s["slo"],
                            concurrency=s["concurrency"], rounds=a.rounds, seed=a.seed)
        report(a.scenario, rounds, mode=a.mode, config=str(a.config), out=out,
               workload=s["workload"] | {"requests": len(s["work"])}, slo=s["slo"],
               seed=a.seed, figures=s.get("figures", basic_figures),
               targets=s.get("targets", ()),
               extra={"command": command_line(a.scenario, argv)})
    return 0


def size_by_capacity(s: dict[str, Any], mode: str) -> None:
    """Size the scenario's burst at OVERLOAD x what plain vLLM serves within the SLO out of a
    probe burst of CAPACITY_PROBE requests (in the same mode), and record how."""
    sized, slo = s["size_by_capacity"], s["slo"]
    print(f"sizing the burst: {CAPACITY_PROBE} requests on plain vLLM ({mode}) ...",
          flush=True)
    [probe] = run_rounds({"plain": s["sides"]["plain"]}, sized(CAPACITY_PROBE), mode=mode,
                         slo=slo, rounds=1, label=", capacity")
    within = sum(1 for row in probe.sides["plain"]["rows"] if slo.met(row))
    n = max(60, min(1000, round(OVERLOAD * within)))
    s["work"] = sized(n)
    s["workload"] = s["workload"] | {"capacity_probe": {
        "requests": CAPACITY_PROBE, "plain_met_slo": within, "overload": OVERLOAD,
        "burst": n}}
    print(f"plain met the SLO on {within} of {CAPACITY_PROBE}: a burst of {n}", flush=True)


def add_round_args(ap: argparse.ArgumentParser) -> None:
    """The protocol's arguments, the same for every scenario."""
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=DEFAULT_ROUNDS,
                    help=f"rounds of every side (default {DEFAULT_ROUNDS}; committed records "
                    "use 5, mixed-resolution 3)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of each round's side order (recorded)")


if __name__ == "__main__":
    sys.exit(main())
