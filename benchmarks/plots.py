"""PNG plots of an A/B record: TTFT CDF per class and side and output throughput over time
(one round), and the spread of the judged figures over rounds.

The CDFs are honest about what was not served: each curve's denominator is every request of
its class, so a side that shed or failed requests ends below 1.0 by that share. A scenario
with an SLO gets its TTFT target drawn as a vertical line. The rounds plot shows every
round's value of each judged figure, its median, its 95% interval and the target's
threshold. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_runs(run: dict[str, dict[str, Any]], stem: Path, title: str,
              ttft_target_s: float | None = None) -> list[Path]:
    """`run`: side name -> result with per-request `rows`. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, result in run.items():
        rows = result.get("rows") or []
        for cls in sorted({r["priority_class"] for r in rows}):
            of_class = [r for r in rows if r["priority_class"] == cls]
            ttfts = sorted(r["ttft_s"] for r in of_class
                           if r["ok"] and r["ttft_s"] is not None)
            if not ttfts:
                continue
            # every request of the class is in the denominator: shed/failed ones never reach
            ys = [(i + 1) / len(of_class) for i in range(len(ttfts))]
            served = len(ttfts) / len(of_class)
            ax.step(ttfts, ys, where="post",
                    label=f"{side} / {cls}" + ("" if served == 1 else f" ({served:.0%} served)"))
    if ttft_target_s is not None:
        ax.axvline(ttft_target_s, color="grey", linestyle="--", linewidth=1,
                   label=f"TTFT target {ttft_target_s:g} s")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("log")
    written.append(_finish(plt, fig, ax, stem.with_name(stem.name + "-ttft-cdf.png"),
                           "time to first token (s, log)", "fraction of requests",
                           f"{title}: TTFT CDF"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, result in run.items():
        rows = [r for r in result.get("rows") or [] if r["ok"] and r.get("first_at") is not None]
        if not rows:
            continue
        end = max(r["done_at"] for r in rows)
        bins = [0.0] * (int(end) + 1)
        for r in rows:  # spread a request's tokens evenly over its decode time
            span = max(r["done_at"] - r["first_at"], 1e-6)
            n = r["output_tokens"]
            for k in range(n):
                t = r["first_at"] + span * k / max(n - 1, 1)
                bins[min(int(t), len(bins) - 1)] += 1
        ax.plot(range(len(bins)), bins, label=side)
    written.append(_finish(plt, fig, ax, stem.with_name(stem.name + "-throughput.png"),
                           "time since start (s)", "output tokens / s",
                           f"{title}: throughput over time"))
    return written


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str,
            title: str) -> Path:
    """Label, save and close one figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_rounds(doc: dict[str, Any], targets: Sequence[Any], stem: Path,
                title: str) -> list[Path]:
    """One panel per judged figure (every ratio figure when the scenario judges none):
    the per-round values, the median, the 95% interval and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = doc.get("figures") or {}
    wanted = [(t.figure, t.threshold, t.name) for t in targets if t.figure in figures]
    if not wanted:
        wanted = [(name, None, name) for name in figures if "_over_" in name]
    wanted = [w for w in wanted if any(v is not None for v in figures[w[0]]["per_round"])]
    if not wanted:
        return []
    fig, axes = plt.subplots(1, len(wanted), figsize=(2.6 * len(wanted) + 1, 3.8),
                             squeeze=False)
    for ax, (name, threshold, label) in zip(axes[0], wanted, strict=True):
        summary = figures[name]
        values = [v for v in summary["per_round"] if v is not None]
        ax.scatter([0] * len(values), values, alpha=0.6, label="rounds")
        if summary["median"] is not None:
            lo, hi = summary["ci95"]
            ax.errorbar([0.25], [summary["median"]],
                        yerr=[[summary["median"] - lo], [hi - summary["median"]]],
                        fmt="o", color="black", capsize=4, label="median, 95% CI")
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlim(-0.5, 0.75)
        ax.set_xticks([])
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: {len(doc.get('rounds') or [])} rounds", fontsize=10)
    fig.tight_layout()
    path = stem.with_name(stem.name + "-rounds.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
