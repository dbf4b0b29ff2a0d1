"""Benchmark pages and README's headline table, generated from the records in
benchmarks/results/ (a table is a view of a record: no number is typed by hand).

    python -m benchmarks.pages            # rewrite README's headline table from the records
    python -m benchmarks.pages --check    # exit 1 if README's table is not what the records say

The docs site builds one page per record with the same functions (docs/gen_pages.py):
how to reproduce it, its verdicts, figures and rounds, and its plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path("benchmarks/results")
README = Path("README.md")
START, END = "<!-- headline:start -->", "<!-- headline:end -->"

# The headline: which verdicts of which records README shows (record stem, verdict name).
HEADLINE = (
    ("priority-inversion-flood-server-cpu", "urgent p99 10x lower"),
    ("priority-inversion-flood-server-cpu", "urgent p99 near unloaded"),
    ("burst-overload-server-cpu", "SLO met"),
    ("mixed-resolution-server-cpu", "3x goodput"),
    ("overhead-server-cpu", "throughput no harm"),
    ("priority-2b-cpu", "interactive before batch"),
    ("priority-2b-cpu", "interactive near unloaded"),
)


def records(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """The protocol's records (those with rounds and verdicts), by file stem."""
    out = {}
    for path in sorted(results.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "verdicts" in doc and "rounds" in doc:
            out[path.stem] = doc
    return out


def reproduce(doc: dict[str, Any]) -> str:
    """The command that makes a record like this one."""
    return doc.get("command") or (
        f"pio-vllm bench {doc['scenario']} --mode {doc['mode']} --rounds {len(doc['rounds'])}")


def record_markdown(doc: dict[str, Any]) -> str:
    """The record's tables, by the scenario's own view of its JSON."""
    if doc["scenario"] == "mixed-resolution":
        from benchmarks.mixed_resolution import markdown as mixed

        return mixed(doc)
    from benchmarks.ab import markdown

    return markdown(doc)


def record_title(doc: dict[str, Any]) -> str:
    """A record's name in the docs: its scenario and mode (an ablation names its
    mechanism)."""
    if doc["scenario"] == "ablation":
        return f"ablation without {doc['workload']['mechanism']} ({doc['mode']})"
    return f"{doc['scenario']} ({doc['mode']})"


def record_page(stem: str, doc: dict[str, Any]) -> str:
    body = record_markdown(doc).split("\n", 1)[1]  # the page has its own title
    plots = "\n".join(f"![{p}]({p})" for p in doc.get("plots") or [])
    return "\n".join([
        f"# {record_title(doc)}", "",
        "Reproduce (uv run --extra cpu --extra bench ...):", "", "```bash",
        reproduce(doc), "```", "",
        f"Record: `benchmarks/results/{stem}.json`.", "", body.strip(), "", "## Plots", "",
        plots or "-", ""])


def _verdict(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in doc["verdicts"] if v["name"] == name), None)


def headline_table(results: Path = RESULTS) -> str:
    """README's table: the headline verdicts with their intervals and rounds."""
    found = records(results)
    lines = ["| record | target | median [95% interval] | rounds | met |",
             "|---|---|---|---|---|"]
    for stem, name in HEADLINE:
        doc = found.get(stem)
        verdict = None if doc is None else _verdict(doc, name)
        if doc is None or verdict is None:
            lines.append(f"| {stem} | {name} | not recorded yet | - | - |")
            continue
        ci = verdict["ci95"]
        lines.append(
            f"| [{doc['scenario']} ({doc['mode']})](benchmarks/results/{stem}.md) | "
            f"{verdict['target']} | {verdict['median']:g} [{ci[0]:g}, {ci[1]:g}] | "
            f"{verdict['rounds']} | {'met' if verdict['met'] else 'not met'} |")
    return "\n".join(lines)


def rewrite_readme(readme: Path = README, results: Path = RESULTS) -> tuple[str, str]:
    """(old, new) README text with the headline table regenerated between its markers."""
    old = readme.read_text()
    head, sep, rest = old.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    return old, f"{head}{START}\n{headline_table(results)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pages",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when README's table differs from the records")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    old, new = rewrite_readme()
    if a.check:
        if old != new:
            print("README's headline table is stale: run python -m benchmarks.pages",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(f"README headline table rewritten from {len(records())} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
