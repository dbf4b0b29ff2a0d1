"""A/B harness: replay one seeded workload on plain vLLM and on pio (in-process mode).

Each side runs in a fresh Python process (`python -m benchmarks.harness --side ...`) with the
same engine arguments (the `engine` section of the settings file, model resolved the same
way), the same requests (same prompt text, priorities, output lengths, arrival offsets) and
the same client-side measurement: TTFT is taken from the request's scheduled arrival to the
first token the caller receives; throughput is output tokens over the wall time of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pio_vllm.admission.metrics import percentile

# pio's admission event counters a side reports (over the run, the warm-up subtracted)
ADMISSION_EVENTS = ("admitted", "deferred", "shed", "late", "expired", "slo_met", "slo_missed")
PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload (JSONL-serialisable)."""

    request_id: str
    priority_class: str
    level: int
    text: str
    max_tokens: int
    arrival_s: float  # offset from the start of the run
    images: tuple[tuple[int, int, int], ...] = ()  # (width, height, seed) of noise images

    def prompt(self) -> str:
        return PROMPT.format(IMAGE_PLACEHOLDER * len(self.images) + self.text)


def make_images(work: list[BenchRequest]) -> dict[str, list[Any]]:
    """The PIL images of each request, built before the run (same pixels on both sides)."""
    import numpy as np
    from PIL import Image

    out: dict[str, list[Any]] = {}
    for req in work:
        out[req.request_id] = [
            Image.fromarray(np.random.default_rng(seed).integers(
                0, 256, (h, w, 3), dtype=np.uint8))
            for w, h, seed in req.images]
    return out


@dataclass(frozen=True)
class Slo:
    """Targets a request must meet to count toward goodput."""

    ttft_s: float
    tpot_s: float

    def met(self, row: dict[str, Any]) -> bool:
        return bool(row["ok"] and row["ttft_s"] is not None and row["ttft_s"] <= self.ttft_s
                    and (row.get("tpot_s") or 0.0) <= self.tpot_s)


def summarise(rows: list[dict[str, Any]], wall_s: float,
              slo: Slo | None = None) -> dict[str, Any]:
    """Per-class and overall numbers from per-request rows."""
    out_tokens = sum(r["output_tokens"] for r in rows if r["ok"])
    tpots = [r["tpot_s"] for r in rows if r["ok"] and r.get("tpot_s") is not None]
    ttfts_all = [r["ttft_s"] for r in rows if r["ok"] and r["ttft_s"] is not None]
    summary: dict[str, Any] = {
        "requests": len(rows),
        "ok": sum(1 for r in rows if r["ok"]),
        "wall_s": round(wall_s, 3),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "ttft_p50_s": _round(percentile(ttfts_all, 50)),
        "ttft_p99_s": _round(percentile(ttfts_all, 99)),
        "tpot_p50_s": _round(percentile(tpots, 50)),
        "tpot_p99_s": _round(percentile(tpots, 99)),
        **_pcts("ttft", ttfts_all), **_pcts("tpot", tpots),
        **_pcts("itl", [g for r in rows if r["ok"] for g in r.get("itl_s") or ()]),
        **_pcts("e2e", [r["e2e_s"] for r in rows if r["ok"]]),
        **_pcts("pio_intake", [r["intake_s"] for r in rows if r.get("intake_s") is not None]),
        "errors": sorted({str(r.get("error")).split(":")[0] for r in rows if not r["ok"]}),
        "classes": {},
    }
    if slo is not None:
        met = sum(1 for r in rows if slo.met(r))
        summary["slo"] = {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}
        summary["slo_met"] = met
        summary["goodput_req_per_s"] = round(met / wall_s, 3) if wall_s > 0 else None
    for cls in sorted({r["priority_class"] for r in rows}):
        ttfts = [r["ttft_s"] for r in rows if r["priority_class"] == cls and r["ttft_s"]]
        e2e = [r["e2e_s"] for r in rows if r["priority_class"] == cls and r["ok"]]
        summary["classes"][cls] = {
            "n": sum(1 for r in rows if r["priority_class"] == cls),
            "ok": sum(1 for r in rows if r["priority_class"] == cls and r["ok"]),
            "ttft_p50_s": _round(percentile(ttfts, 50)),
            "ttft_p90_s": _round(percentile(ttfts, 90)),
            "ttft_p99_s": _round(percentile(ttfts, 99)),
            "ttft_max_s": _round(max(ttfts) if ttfts else None),
            "e2e_p50_s": _round(percentile(e2e, 50)),
            "e2e_p99_s": _round(percentile(e2e, 99)),
            "preemptions": sum(r.get("preemptions", 0) for r in rows
                               if r["priority_class"] == cls),
        }
        if slo is not None:
            summary["classes"][cls]["slo_met"] = sum(
                1 for r in rows if r["priority_class"] == cls and slo.met(r))
    return summary


def _pcts(name: str, values: list[float]) -> dict[str, float | None]:
    return {f"{name}_p{q}_s": _round(percentile(values, q)) for q in (50, 90, 99)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


WARMUP_SHAPES = ((224, 224), (448, 336), (320, 240))  # a workload without images


def warmup_work(work: list[BenchRequest]) -> list[list[BenchRequest]]:
    """The same warm-up for both sides before the measured run, in three waves of 16-token
    requests: two with three text requests and one image per image size the workload uses
    (at least five, at most eight), then, one at a time, a text request and an image per
    size. The first two pay one-time costs (first image, first batch shapes) and give pio's
    step-time model the ~32 engine steps it fits on; the third runs once pio's model is
    fitted (`warm_up`'s `ready`), so its service times have a sample of each size as a
    long-running server's would (requests served before the fit teach nothing; without them
    a burst's first images were priced from text's ratio, 0.64 s for a 448x336 image served
    in 0.35 s). The images are not the workload's (other pixels: no cache is primed); the
    class is the workload's lowest."""
    low = max(work, key=lambda r: r.level) if work else BenchRequest("", "standard", 1, "", 0, 0)
    distinct = list(dict.fromkeys((w, h) for r in work for w, h, _ in r.images))[:8]
    shapes = list(distinct or WARMUP_SHAPES)
    while len(shapes) < 5:
        shapes += shapes[:5 - len(shapes)]
    seeds = itertools.count(900_001)
    images = [((w, h, next(seeds)),) for w, h in shapes]
    half = (len(images) + 1) // 2
    waves: list[list[tuple[tuple[int, int, int], ...]]] = [
        [(), *images[:half]], [(), (), *images[half:]],
        [(), *(((w, h, next(seeds)),) for w, h in distinct or WARMUP_SHAPES)]]
    count = itertools.count()
    return [[BenchRequest(f"warmup-{i}", low.priority_class, low.level, f"warm up {i}", 16,
                          0.0, imgs) for imgs in wave for i in [next(count)]]
            for wave in waves]


async def warm_up(work: list[BenchRequest], submit: Any,
                  ready: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run `warmup_work(work)` through a side's `submit` (rows are discarded); `ready`
    (pio: its step model is fitted) is awaited before the last wave."""
    waves = warmup_work(work)
    for i, wave in enumerate(waves):
        if i < len(waves) - 1:
            rows = await asyncio.gather(*(submit(r, time.perf_counter()) for r in wave))
        else:  # one at a time: each size's service time alone, as a calibration sample
            if ready is not None:
                await ready()
            rows = [await submit(r, time.perf_counter()) for r in wave]
        # a request pio refused (SLO admission: 429 / RequestRejectedError) is its answer,
        # not a failure of the warm-up
        failed = [r for r in rows if not r.get("ok") and not _refused(r)]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0].get('error')}")


def _refused(row: dict[str, Any]) -> bool:
    error = str(row.get("error"))
    return error.startswith("HTTP 429") or "RequestRejectedError" in error


async def _replay(work: list[BenchRequest], submit: Any,
                  concurrency: int | None = None) -> tuple[list[dict[str, Any]], float]:
    """Fire each request at its arrival offset, or (closed loop, `concurrency` set) as soon
    as one of `concurrency` slots frees; `submit(req, t_arrival)` returns a row."""
    t0 = time.perf_counter()
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    progress = _Progress(len(work))

    async def one(req: BenchRequest) -> dict[str, Any]:
        if gate is not None:
            async with gate:
                row = dict(await submit(req, time.perf_counter()))
                progress.tick()
                return row
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        row = dict(await submit(req, t0 + req.arrival_s))
        progress.tick()
        return row

    rows = await asyncio.gather(*(one(r) for r in work))
    progress.close()
    for row in rows:  # times relative to the start of the run (for throughput over time)
        for key in ("first_at", "done_at"):
            if row.get(key) is not None:
                row[key] = round(row[key] - t0, 4)
    return list(rows), time.perf_counter() - t0


class _Progress:
    """A progress bar on stderr (tqdm, which vLLM installs)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc="requests", unit="req", file=sys.stderr,
                         mininterval=1.0, leave=False)

    def tick(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _tpot(first_at: float | None, last_at: float | None, n: int) -> float | None:
    if first_at is None or last_at is None or n < 2:
        return None
    return (last_at - first_at) / (n - 1)


async def run_plain(settings_path: str, work: list[BenchRequest],
                    slo: Slo | None = None, concurrency: int | None = None) -> dict[str, Any]:
    """Plain vLLM AsyncLLM with the same engine arguments and priorities."""
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from pio_vllm.engine.vllm_backend import build_engine_args, resolve_model
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    for k, v in settings.vllm_env.items():
        os.environ[k] = v
    # Plain vLLM: vLLM's own default scheduler, whatever pio's tuning settings say.
    plain = settings.model_copy(update={
        "tuning": settings.tuning.model_copy(update={"enabled": False})})
    llm = AsyncLLM.from_engine_args(build_engine_args(plain, resolve_model(settings)))
    images = make_images(work + [r for wave in warmup_work(work) for r in wave])

    async def submit(req: BenchRequest, t_arrival: float) -> dict[str, Any]:
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True, temperature=0.0)
        ttft, n, first_at, gaps, last = None, 0, None, [], None
        prompt: dict[str, Any] = {"prompt": req.prompt()}
        if req.images:
            prompt["multi_modal_data"] = {"image": images[req.request_id]}
        async for out in llm.generate(prompt, params, req.request_id, priority=req.level):  # type: ignore[arg-type]
            now = time.perf_counter()
            if len(out.outputs[0].token_ids) > n and last is not None:
                gaps.append(now - last)
            if len(out.outputs[0].token_ids) > n:
                last = now
            n = len(out.outputs[0].token_ids)
            if ttft is None and n:
                first_at = now
                ttft = first_at - t_arrival
        done = time.perf_counter()
        return {"request_id": req.request_id, "priority_class": req.priority_class,
                "ok": True, "ttft_s": ttft, "output_tokens": n, "itl_s": gaps,
                "first_at": first_at, "done_at": done,
                "tpot_s": _tpot(first_at, done, n), "e2e_s": done - t_arrival}

    try:
        await warm_up(work, submit)
        rows, wall = await _replay(work, submit, concurrency)
    finally:
        llm.shutdown()
    return summarise(rows, wall, slo) | {"rows": rows}


async def _model_fitted(engine: Any, timeout_s: float = 15.0) -> None:
    """Wait (bounded) for SLO admission's step model after the warm-up; a config without
    SLO targets or tuning has none to wait for."""
    settings = engine.settings
    if not (settings.admission.enabled and settings.admission.slo_admission and any(
            c.ttft_target_s is not None for c in settings.priority_classes.values())):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        admission = engine.stats().admission
        if admission is None or admission.slo.model is not None:
            return
        await asyncio.sleep(0.25)
    print("warning: no step-time model fitted after the warm-up; SLO admission starts "
          "inactive", file=sys.stderr)


def _event_counts(stats: Any) -> dict[str, int]:
    """pio's admission event counters, summed over classes (to subtract the warm-up)."""
    if stats.admission is None:
        return {}
    classes = stats.admission.classes.values()
    return {name: sum(getattr(c, name) for c in classes)
            for name in ADMISSION_EVENTS}


async def run_pio(settings_path: str, work: list[BenchRequest],
                  slo: Slo | None = None, concurrency: int | None = None) -> dict[str, Any]:
    """PioEngine with the same settings (admission, preemption as configured)."""
    from pio_vllm.engine.pio_engine import PioEngine
    from pio_vllm.errors import PioError
    from pio_vllm.request import PioRequest
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    images = make_images(work + [r for wave in warmup_work(work) for r in wave])
    async with PioEngine(settings) as engine:
        async def submit(req: BenchRequest, t_arrival: float) -> dict[str, Any]:
            ttft, n, pre, first_at, gaps, last, intake = None, 0, 0, None, [], None, None
            try:
                async for out in engine.generate(PioRequest(
                        prompt=req.prompt(), raw_prompt=True, images=images[req.request_id],
                        priority=req.priority_class, request_id=req.request_id,
                        sampling={"max_tokens": req.max_tokens, "ignore_eos": True,
                                  "temperature": 0.0})):
                    now = time.perf_counter()
                    if out.token_ids:
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    n += len(out.token_ids)
                    if ttft is None and out.token_ids:
                        first_at = now
                        ttft = first_at - t_arrival
                    if out.result is not None:
                        pre = out.result.preemptions or 0
                        intake = out.result.timings.intake_s
                ok, error = True, None
            except PioError as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            done = time.perf_counter()
            return {"request_id": req.request_id, "priority_class": req.priority_class,
                    "ok": ok, "ttft_s": ttft, "output_tokens": n, "preemptions": pre,
                    "tpot_s": _tpot(first_at, done, n) if ok else None, "itl_s": gaps,
                    "first_at": first_at, "done_at": done, "intake_s": intake,
                    "e2e_s": done - t_arrival, "error": error}

        await warm_up(work, submit, ready=lambda: _model_fitted(engine))
        before = _event_counts(engine.stats())
        rows, wall = await _replay(work, submit, concurrency)
        stats = engine.stats()
    result = summarise(rows, wall, slo) | {"rows": rows}
    if stats.admission is not None:
        classes = stats.admission.classes.values()
        result["admission_capacity"] = stats.admission.capacity
        after = _event_counts(stats)
        result["admission_events"] = {k: after[k] - before.get(k, 0) for k in after}
        result["shed"], result["expired"] = (result["admission_events"]["shed"],
                                             result["admission_events"]["expired"])
        errors = [c.ttft_prediction_error_p50 for c in classes
                  if c.ttft_prediction_error_p50 is not None]
        result["ttft_prediction_error_p50"] = min(errors) if len(errors) == 1 else (
            None if not errors else sum(errors) / len(errors))
        work_model = stats.admission.slo.model
        result["service_calibration"] = {
            "overall": round(stats.admission.slo.calibration, 3),
            "seconds_per_vision_token_by_size_class": {
                str(k): v for k, v in stats.admission.slo.service_s_by_size.items()},
            "preparation_seconds_by_size_class": {
                str(k): v for k, v in stats.admission.slo.prep_s_by_size.items()}}
        if work_model is not None:
            result["step_model"] = {
                "base_seconds": work_model.base_s,
                "seconds_per_token": work_model.per_token_s,
                "seconds_per_vision_token": work_model.per_vision_token_s}
    if stats.tuning is not None:
        model = stats.tuning.model
        result["tuning"] = {
            "limits": {"max_active": stats.tuning.limits.max_active,
                       "max_tokens": stats.tuning.limits.max_tokens,
                       "source": stats.tuning.limits.source.value},
            "step_model": None if model is None else {
                "base_s": round(model.base_s, 6), "per_token_s": model.per_token_s,
                "per_vision_token_s": model.per_vision_token_s, "r2": round(model.r2, 4),
                "samples": model.samples},
        }
    return result


def run_side_subprocess(side: str, settings_path: str, workload_path: Path,
                        out_path: Path, slo: Slo | None = None,
                        concurrency: int | None = None) -> dict[str, Any]:
    """Run one side in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, "-m", "benchmarks.harness", "--side", side, "--config",
           settings_path, "--workload", str(workload_path), "--out", str(out_path)]
    if slo is not None:
        cmd += ["--slo-ttft-s", str(slo.ttft_s), "--slo-tpot-s", str(slo.tpot_s)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    print(f"  running {side} side ...", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # progress: stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    data: dict[str, Any] = json.loads(out_path.read_text())
    return data


def derive_config(base: Path, out: Path, **sections: Any) -> Path:
    """Write `base` (a settings YAML) with `sections` merged one level deep to `out`."""
    import yaml

    config = yaml.safe_load(base.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    out.write_text(yaml.safe_dump(config))
    return out


def write_workload(work: list[BenchRequest], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in work))


def read_workload(path: Path) -> list[BenchRequest]:
    out = []
    for line in path.read_text().splitlines():
        if line:
            row = json.loads(line)
            row["images"] = tuple(tuple(i) for i in row.get("images", ()))
            out.append(BenchRequest(**row))
    return out


def environment(settings_path: str) -> dict[str, Any]:
    import torch
    import transformers
    import vllm

    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    # changes to the code, not the records a run writes into benchmarks/results
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)benchmarks/results"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores, {cpu_model()})",
        "engine_args": settings.engine, "admission": settings.admission.model_dump(),
        "git_commit": (commit + ("+changes" if dirty else "")) if commit else None,
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    import platform

    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def ratio_text(r: float | None, undefined: str = "-") -> str:
    """A ratio for a table ("1.25x"); `undefined` where `ratio` had none (a zero base)."""
    return undefined if r is None else f"{r}x"


def _main() -> None:
    ap = argparse.ArgumentParser(description="run one side of an A/B benchmark")
    ap.add_argument("--side", choices=["plain", "pio"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workload", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slo-ttft-s", type=float, default=None)
    ap.add_argument("--slo-tpot-s", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="closed loop")
    a = ap.parse_args()
    work = read_workload(a.workload)
    slo = Slo(a.slo_ttft_s, a.slo_tpot_s) if a.slo_ttft_s and a.slo_tpot_s else None
    runner = run_plain if a.side == "plain" else run_pio
    result = asyncio.run(runner(a.config, work, slo, a.concurrency))
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    _main()
    # vLLM leaves non-daemon threads in some shutdown paths; the result is written.
    sys.stdout.flush()
    os._exit(0)
