"""`pio-vllm demo` (README's main command) as a user runs it, and the CLI's settings
reference; the demo runs as a subprocess on the tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_demo_shows_interactive_served_near_unloaded_during_a_flood() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pio_vllm", "demo", "--batch", "12", "--interactive", "4",
         "--max-tokens", "96"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "request   class" in out and "queued_ms" in out and "preempt" in out
    rows = [line for line in out.splitlines() if re.match(r"(batch|inter)-\d\d ", line)]
    assert len(rows) == 16
    assert any(" text " in r for r in rows) and any("1024x768" in r for r in rows)
    assert "requests: 16/16 ok" in out and "[16/16]" in out  # progress lines
    p50 = {cls: float(m) for cls, m in re.findall(
        r"(interactive|batch)\s+during the flood: \d+ requests, TTFT p50 (\d+) ms", out)}
    assert p50["interactive"] * 3 <= p50["batch"], p50  # the point of the demo
    preempted = re.search(r"batch\s+during the flood:.*preempted (\d+) times", out)
    assert preempted and int(preempted.group(1)) > 0


def test_bad_config_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("engine: {model: pio:tiny}\nimages: {decode_workers: 0}\n")
    for command in (["demo"], ["config"]):
        proc = subprocess.run(
            [sys.executable, "-m", "pio_vllm", *command, "--config", str(cfg)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, (command, proc.stderr[-2000:])
        assert "ConfigError" in proc.stderr and "decode_workers" in proc.stderr


def test_config_command_prints_sources_and_descriptions() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pio_vllm", "config"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PIO_ADMISSION__LOOKAHEAD": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "admission.lookahead = 3  [env]" in out
    assert "engine.max_num_seqs = 8  [file]" in out
    assert "admission.max_preparing = 2  [default]" in out
    assert "Prepared requests admitted beyond max_num_seqs" in out  # descriptions
