"""A 10-request A/B scenario end to end, in-process and server mode (real vLLM, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.scenarios import main as bench_main
from tests.helpers import TINY_CONFIG

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.mark.parametrize("mode", ["inproc", "server"])
def test_smoke_scenario_runs_both_sides(mode: str, tmp_path: Path) -> None:
    out = tmp_path / f"smoke-{mode}.json"
    assert bench_main(["smoke", "--mode", mode, "--config", str(TINY_CONFIG),
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    run = doc["runs"][0]
    assert set(run) == {"plain", "pio"}
    for side in run.values():
        assert side["requests"] == 10 and side["ok"] == 10, side["errors"]
        assert side["output_tok_per_s"] > 0 and side["ttft_p50_s"] > 0
    assert run["pio"]["classes"]["interactive"]["n"] == run["plain"]["classes"][
        "interactive"]["n"]
    if mode == "inproc":
        assert run["pio"]["pio_intake_p50_s"] is not None  # measured inside pio
    assert doc["ratios"][0]["pio"]["throughput"] > 0
    assert doc["environment"]["vllm"].startswith("0.")
    for png in doc["plots"]:
        assert (tmp_path / png).stat().st_size > 1000
    assert "| plain |" in out.with_suffix(".md").read_text()
