"""Judge records again from their rounds: figures' medians and intervals, verdicts, the
rounds plot and the markdown table.

    python -m benchmarks.rereport benchmarks/results/priority-inversion-flood-server-h100.json

For records made where scipy or matplotlib is missing (the GPU machine's offline bundle):
the record keeps every round's figures, and this adds what needs them. Per-request plots
(TTFT CDFs) need the raw rows, which only the run had; the rounds plot is redrawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.ab import judge, write
from benchmarks.pages import record_markdown
from benchmarks.plots import plot_rounds
from benchmarks.scenarios import targets_of


def rereport(path: Path) -> dict[str, object]:
    doc = json.loads(path.read_text())
    targets = targets_of(doc)
    judge(doc, targets, [rec["figures"] for rec in doc["rounds"]], int(doc.get("seed", 0)))
    if "pending" in doc:
        raise SystemExit(f"{path}: {doc['pending']}")
    drawn = plot_rounds(doc, targets, path.with_suffix(""),
                        title=f"{doc['scenario']} ({doc['mode']})")
    doc["plots"] = sorted({*doc.get("plots", []), *(p.name for p in drawn)})
    write(doc, path, record_markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rereport",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    for path in a.records:
        rereport(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
