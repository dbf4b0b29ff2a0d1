"""Pages the docs build generates (mkdocs-gen-files): the settings reference, from the
settings' own descriptions as `pio-vllm config` prints them, and one page per benchmark
record in benchmarks/results/, with its plots, from the record's JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.pages import RESULTS, record_page, record_title, records  # noqa: E402
from pio_vllm.settings import PioSettings, explain  # noqa: E402

CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def settings_reference() -> str:
    lines = ["# Settings reference", "",
             "Every setting, generated from the settings' own descriptions (the same text "
             "`pio-vllm config` prints), with its value in `configs/tiny-cpu.yaml` and where "
             "that value comes from (file or default). `engine` and `vllm_env` pass through "
             "to vLLM: any `AsyncEngineArgs` field and any environment variable for vLLM's "
             "processes may appear there.", ""]
    section = None
    for line in explain(PioSettings.load(CONFIG), CONFIG):
        top = line.name.split(".", 1)[0]
        if top != section:
            section = top
            lines += ["", f"## {top}", "", "| setting | value | source | meaning |",
                      "|---|---|---|---|"]
        meaning = (line.description or "").replace("|", "\\|").replace("\n", " ")
        value = repr(line.value).replace("|", "\\|")
        lines.append(f"| `{line.name}` | `{value}` | {line.source} | {meaning} |")
    return "\n".join(lines) + "\n"


with mkdocs_gen_files.open("reference/settings.md", "w") as f:
    f.write(settings_reference())

results = ROOT / RESULTS
found = records(results)
summary = ["* [How records are made](index.md)", "* [Results](results.md)"]
for stem, doc in found.items():
    with mkdocs_gen_files.open(f"benchmarks/{stem}.md", "w") as f:
        f.write(record_page(stem, doc))
    for png in doc.get("plots") or []:
        if (results / png).is_file():
            with mkdocs_gen_files.open(f"benchmarks/{png}", "wb") as f:
                f.write((results / png).read_bytes())
    summary.append(f"    * [{record_title(doc)}]({stem}.md)")
# The simulator's tables (benchmarks/sim_*.py and `pio-vllm simulate --json-out`) beside
# the records they are judged against, each with its plot where it has one.
for md in sorted(results.glob("sim-*.md")):
    with mkdocs_gen_files.open(f"benchmarks/{md.name}", "w") as f:
        f.write(md.read_text())
    png = md.with_suffix(".png")
    if png.is_file():
        with mkdocs_gen_files.open(f"benchmarks/{png.name}", "wb") as f:
            f.write(png.read_bytes())
    summary.append(f"    * [simulator: {md.stem.removeprefix('sim-')}]({md.name})")
with mkdocs_gen_files.open("benchmarks/SUMMARY.md", "w") as f:
    f.write("\n".join(summary) + "\n")


def results_page() -> str:
    lines = ["# Results", "",
             "Every committed record's verdicts (median over rounds, 95% bootstrap interval "
             "over rounds; the rules are in [How records are made](index.md)).", ""]
    for stem, doc in found.items():
        lines += [f"## [{record_title(doc)}]({stem}.md)", "",
                  f"{len(doc['rounds'])} rounds; {doc['environment'].get('device')}.", "",
                  "| target | median | 95% interval | met |", "|---|---|---|---|"]
        for v in doc["verdicts"]:
            ci = "-" if v["ci95"] is None else f"[{v['ci95'][0]:g}, {v['ci95'][1]:g}]"
            median = "-" if v["median"] is None else f"{v['median']:g}"
            lines.append(f"| {v['target']} | {median} | {ci} | "
                         f"{'met' if v['met'] else '**not met**'} |")
        lines.append("")
    if not found:
        lines.append("No record made with the protocol yet.")
    return "\n".join(lines) + "\n"


with mkdocs_gen_files.open("benchmarks/results.md", "w") as f:
    f.write(results_page())
