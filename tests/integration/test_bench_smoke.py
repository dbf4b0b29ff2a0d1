"""The A/B harness end to end: the 10-request smoke scenario in-process through the
`pio-vllm bench` command (both sides, fresh engines, the report), and server mode's client
replaying a workload against the shared `pio-vllm serve` (real vLLM, CPU). Starting plain
vLLM's server is exercised by the server-mode benchmarks."""

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
    return Job([sys.executable, "-m", "pio_vllm", "bench", "smoke", "--mode", "inproc",
                "--config", str(TINY_CONFIG), "--out", str(folder / "smoke-inproc.json")],
               ROOT)


EARLY = {"smoke-inproc": Early("test_smoke_scenario_runs_both_sides", smoke_job)}


def test_smoke_scenario_runs_both_sides(early_start: EarlyStart) -> None:
    """`pio-vllm bench smoke` in-process: each side in a fresh interpreter with its own
    engine, one after the other (started early, beside the session engine's start:
    tests/early_start.py)."""
    proc = early_start.result("smoke-inproc")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.folder / "smoke-inproc.json"
    doc = json.loads(out.read_text())
    run = doc["runs"][0]
    assert set(run) == {"plain", "pio"}
    for side in run.values():
        assert side["requests"] == 10 and side["ok"] == 10, side["errors"]
        assert side["output_tok_per_s"] > 0 and side["ttft_p50_s"] > 0
    assert run["pio"]["classes"]["interactive"]["n"] == run["plain"]["classes"][
        "interactive"]["n"]
    assert run["pio"]["pio_intake_p50_s"] is not None  # measured inside pio
    assert doc["ratios"][0]["pio"]["throughput"] > 0
    assert doc["environment"]["vllm"].startswith("0.")
    for png in doc["plots"]:
        assert (proc.folder / png).stat().st_size > 1000
    assert "| plain |" in out.with_suffix(".md").read_text()


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
