"""Benchmark pages and README's headline table come from the records (benchmarks/pages.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.pages import END, START, headline_table, record_page, records, rewrite_readme


def _record(path: Path, median: float, met: bool) -> dict[str, object]:
    doc = {
        "scenario": "overhead", "mode": "server", "seed": 0, "rounds": [
            {"round": 0, "order": ["pio", "plain"], "figures": {"throughput_pio_over_plain": 1},
             "sides": {}}],
        "figures": {"throughput_pio_over_plain": {"per_round": [1.0], "median": 1.0,
                                                  "ci95": [1.0, 1.0]}},
        "verdicts": [{"name": "throughput no harm", "target": "pio/plain >= 0.98x",
                      "median": median, "ci95": [median - 0.02, median + 0.02],
                      "rounds": 5, "met": met}],
        "environment": {"device": "cpu"}, "plots": ["overhead-server-cpu-rounds.png"],
        "command": "pio-vllm bench overhead --mode server --rounds 5",
    }
    path.write_text(json.dumps(doc))
    return doc


def test_the_headline_shows_recorded_verdicts_and_names_the_missing(tmp_path: Path) -> None:
    _record(tmp_path / "overhead-server-cpu.json", 1.01, True)
    (tmp_path / "old-format.json").write_text(json.dumps({"runs": []}))  # not a record
    assert list(records(tmp_path)) == ["overhead-server-cpu"]
    table = headline_table(tmp_path)
    assert "| pio/plain >= 0.98x | 1.01 [0.99, 1.03] | 5 | met |" in table
    assert "(benchmarks/results/overhead-server-cpu.md)" in table
    assert "| priority-inversion-flood-server-cpu | urgent p99 10x lower | not recorded yet" in (
        table)


def test_a_record_page_says_how_to_reproduce_it(tmp_path: Path) -> None:
    doc = _record(tmp_path / "overhead-server-cpu.json", 0.95, False)
    page = record_page("overhead-server-cpu", doc)
    assert "pio-vllm bench overhead --mode server --rounds 5" in page
    assert "**not met**" in page and "![overhead-server-cpu-rounds.png]" in page


def test_readme_table_is_rewritten_between_its_markers(tmp_path: Path) -> None:
    _record(tmp_path / "overhead-server-cpu.json", 1.01, True)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale\n{END}\noutro\n")
    old, new = rewrite_readme(readme, tmp_path)
    assert "stale" in old and "stale" not in new
    assert new.startswith("intro\n") and new.endswith(f"{END}\noutro\n")
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        rewrite_readme(readme, tmp_path)


def _pending_record(path: Path) -> None:
    doc = {"scenario": "overhead", "mode": "server", "seed": 0, "workload": {},
           "environment": {"device": "NVIDIA H100"}, "plots": [], "verdicts": [],
           "figures": {}, "pending": "scipy and matplotlib not installed where this ran",
           "rounds": [{"round": i, "order": ["plain", "pio"], "sides": {},
                       "figures": {"throughput_pio_over_plain": v}}
                      for i, v in enumerate((1.01, 0.99, 1.03))]}
    path.write_text(json.dumps(doc))


def test_a_record_made_without_scipy_is_judged_later(tmp_path: Path) -> None:
    from benchmarks.rereport import rereport

    path = tmp_path / "overhead-server-h100.json"
    _pending_record(path)
    doc = rereport(path)
    assert "pending" not in doc
    [verdict] = doc["verdicts"]  # type: ignore[misc]
    assert verdict["rounds"] == 3 and verdict["met"] and verdict["median"] == 1.01
    assert (tmp_path / "overhead-server-h100-rounds.png").stat().st_size > 1000
    assert "## Verdicts" in path.with_suffix(".md").read_text()


def test_without_scipy_the_record_says_what_is_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from benchmarks.ab import judge

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else real(name, *a))
    doc: dict[str, object] = {}
    judge(doc, [], [{"x": 1.0}], 0)
    assert doc["verdicts"] == [] and "benchmarks.rereport" in str(doc["pending"])
