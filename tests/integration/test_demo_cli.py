"""`pio-vllm demo` (README's main command) as a user runs it: a subprocess on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_demo_exits_zero_with_its_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pio_vllm", "demo", "--requests", "6", "--max-tokens", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "request   class" in out and "vis_tok" in out and "ttft_ms" in out
    rows = [line for line in out.splitlines() if line.startswith("demo-")]
    assert len(rows) == 6
    assert any(" text " in r for r in rows) and any("1024x768" in r for r in rows)
    assert "interactive" in out and "batch" in out
    assert "requests: 6/6 ok" in out
    assert "[ 6/6]" in out  # progress lines


def test_bad_config_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("engine: {model: pio:tiny}\nimages: {decode_workers: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pio_vllm", "demo", "--config", str(cfg)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "ConfigError" in proc.stderr and "decode_workers" in proc.stderr
