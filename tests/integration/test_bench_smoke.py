"""The A/B harness end to end: `pio-vllm bench suite --profile cpu-smoke` (the 10-request
smoke scenario in-process, two rounds: both sides, fresh engines, the protocol's report),
and server mode's client replaying a workload against the shared `pio-vllm serve` (real
vLLM, CPU). Starting plain vLLM's server is exercised by the server-mode benchmarks."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.harness import Slo
from tests.early_start import Early, EarlyStart, Job
from tests.helpers import ROOT, TINY_CONFIG
from tests.server_helpers import MODEL, Server

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def smoke_job(folder: Path) -> Job:
    return Job([sys.executable, "-m", "pio_vllm", "bench", "suite", "--profile", "cpu-smoke",
                "--config", str(TINY_CONFIG), "--out-dir", str(folder)], ROOT)


EARLY = {"suite-cpu-smoke": Early("test_cpu_smoke_suite_records_rounds_and_verdicts",
                                  smoke_job)}


def test_cpu_smoke_suite_records_rounds_and_verdicts(early_start: EarlyStart) -> None:
    """`pio-vllm bench suite --profile cpu-smoke`: the smoke scenario in-process, two rounds,
    each side in a fresh interpreter with its own engine, the order drawn per round, every
    round's figures, their intervals and the verdicts (started early, beside the session
    engine's start: tests/early_start.py)."""
    proc = early_start.result("suite-cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((proc.folder / "suite-cpu-smoke.json").read_text())
    [step] = suite["steps"]
    assert step["status"] == "ok" and step["result"] == "smoke-inproc-cpu-smoke.json"
    out = proc.folder / step["result"]
    doc = json.loads(out.read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    for rec in doc["rounds"]:
        assert sorted(rec["order"]) == ["pio", "plain"]
        assert list(rec["sides"]) == ["plain", "pio"]
        for side in rec["sides"].values():
            assert side["requests"] == 10 and side["ok"] == 10, side["errors"]
            assert side["output_tok_per_s"] > 0 and side["ttft_p50_s"] > 0
            assert len(side["requests_detail"]) == 10
        assert rec["sides"]["pio"]["pio_intake_p50_s"] is not None  # measured inside pio
        assert rec["figures"]["throughput_pio_over_plain"] > 0
    throughput = doc["figures"]["throughput_pio_over_plain"]
    assert len(throughput["per_round"]) == 2
    lo, hi = throughput["ci95"]
    assert lo <= throughput["median"] <= hi
    [verdict] = doc["verdicts"]
    assert set(verdict) == {"name", "target", "median", "ci95", "rounds", "met"}
    assert verdict["rounds"] == 2 and verdict["met"] is False  # 2 rounds decide nothing
    assert doc["environment"]["vllm"].startswith("0.") and doc["environment"]["transformers"]
    for png in doc["plots"]:
        assert (proc.folder / png).stat().st_size > 1000
    assert any(p.endswith("-rounds.png") for p in doc["plots"])
    table = out.with_suffix(".md").read_text()
    assert "## Verdicts" in table and "| plain |" in table
    assert "smoke-inproc" in (proc.folder / "suite-cpu-smoke.md").read_text()


def test_server_mode_replay_against_a_live_pio_server(server: Server) -> None:
    """The server-mode client: streaming chat with images as data URLs, priority headers,
    TTFT from the first content chunk, 429 counted as shed, pio's counters scraped."""
    from benchmarks.scenarios import SMOKE
    from benchmarks.server_mode import replay
    from benchmarks.workload import generate

    # the shared server has API keys; key-plain may use its default class
    work = [replace(req, priority_class="standard", level=1) for req in generate(SMOKE)]
    result = asyncio.run(replay("pio", server.base_url, MODEL, work, Slo(5.0, 0.5), None,
                                headers={"Authorization": "Bearer key-plain"},
                                wait_for_model=None))
    assert result["requests"] == 10 and result["ok"] + result["shed_429"] == 10
    assert result["ok"] >= 8, result["errors"]
    assert result["ttft_p50_s"] > 0 and result["output_tok_per_s"] > 0
    assert result["admission_events"]["admitted"] >= result["ok"]
    assert result["preemptions"] >= 0 and result["engine_preemptions"] >= 0
    # the server's own measure of the same requests, from its gate: within the client's
    timing = result["server_timings"]["standard"]
    assert timing["requests"] == result["ok"], timing
    assert 0 < timing["server_ttft_mean_s"] <= timing["client_ttft_mean_s"], timing
    assert 0 <= timing["server_queue_wait_mean_s"] <= timing["server_ttft_mean_s"], timing
