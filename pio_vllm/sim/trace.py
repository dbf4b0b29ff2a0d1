"""Traces: the requests a simulation (or a real replay) serves (pure code).

A trace is a CSV with exactly the columns `arrival_s,class,prompt_tokens,output_tokens,
image_w,image_h`: `class` a configured priority class; `prompt_tokens` the text tokens (the
image's vision tokens follow from its size by Qwen3-VL's resize rule); `image_w,image_h`
0,0 for no image, at most one image per row; output lengths fixed (`ignore_eos`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pio_vllm.errors import ConfigError

COLUMNS = ("arrival_s", "class", "prompt_tokens", "output_tokens", "image_w", "image_h")


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace."""

    arrival_s: float
    priority_class: str
    prompt_tokens: int  # text tokens; an image's vision tokens come on top
    output_tokens: int
    image_w: int = 0
    image_h: int = 0

    @property
    def has_image(self) -> bool:
        return self.image_w > 0 and self.image_h > 0


def read_trace(path: str | Path, classes: Iterable[str] | None = None) -> list[TraceRow]:
    """The rows of a trace CSV, in arrival order; a bad row is a ConfigError naming it."""
    text = Path(path).read_text()
    return parse_trace(text, str(path), classes)


def parse_trace(text: str, name: str = "trace",
                classes: Iterable[str] | None = None) -> list[TraceRow]:
    known = set(classes) if classes is not None else None
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ConfigError(f"{name}: columns {reader.fieldnames}; accepted: exactly "
                          f"{','.join(COLUMNS)}")
    rows = []
    for line, raw in enumerate(reader, start=2):
        try:
            row = TraceRow(float(raw["arrival_s"]), raw["class"], int(raw["prompt_tokens"]),
                           int(raw["output_tokens"]), int(raw["image_w"]),
                           int(raw["image_h"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name} line {line}: {dict(raw)}: {e}") from e
        if row.arrival_s < 0 or row.prompt_tokens < 0 or row.output_tokens < 1 or (
                row.image_w < 0 or row.image_h < 0 or (row.image_w == 0) != (row.image_h == 0)):
            raise ConfigError(f"{name} line {line}: {dict(raw)}: accepted: arrival_s >= 0, "
                              "prompt_tokens >= 0, output_tokens >= 1, image_w,image_h both 0 "
                              "or both positive")
        if known is not None and row.priority_class not in known:
            raise ConfigError(f"{name} line {line}: class {row.priority_class!r} is not "
                              f"configured; accepted: {sorted(known)}")
        rows.append(row)
    return sorted(rows, key=lambda r: r.arrival_s)


def format_trace(rows: Sequence[TraceRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([f"{r.arrival_s:.6f}", r.priority_class, r.prompt_tokens,
                         r.output_tokens, r.image_w, r.image_h])
    return out.getvalue()


def write_trace(rows: Sequence[TraceRow], path: str | Path) -> None:
    Path(path).write_text(format_trace(rows))
