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
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pio_vllm.admission.metrics import percentile

PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload (JSONL-serialisable)."""

    request_id: str
    priority_class: str
    level: int
    text: str
    max_tokens: int
    arrival_s: float  # offset from the start of the run


def summarise(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Per-class and overall numbers from per-request rows."""
    out_tokens = sum(r["output_tokens"] for r in rows if r["ok"])
    summary: dict[str, Any] = {
        "requests": len(rows),
        "ok": sum(1 for r in rows if r["ok"]),
        "wall_s": round(wall_s, 3),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "classes": {},
    }
    for cls in sorted({r["priority_class"] for r in rows}):
        ttfts = [r["ttft_s"] for r in rows if r["priority_class"] == cls and r["ttft_s"]]
        e2e = [r["e2e_s"] for r in rows if r["priority_class"] == cls and r["ok"]]
        summary["classes"][cls] = {
            "n": sum(1 for r in rows if r["priority_class"] == cls),
            "ok": sum(1 for r in rows if r["priority_class"] == cls and r["ok"]),
            "ttft_p50_s": _round(percentile(ttfts, 50)),
            "ttft_p99_s": _round(percentile(ttfts, 99)),
            "ttft_max_s": _round(max(ttfts) if ttfts else None),
            "e2e_p50_s": _round(percentile(e2e, 50)),
            "preemptions": sum(r.get("preemptions", 0) for r in rows
                               if r["priority_class"] == cls),
        }
    return summary


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


async def _replay(work: list[BenchRequest], submit: Any) -> tuple[list[dict[str, Any]], float]:
    """Fire each request at its arrival offset; `submit(req, t_arrival)` returns a row."""
    t0 = time.perf_counter()

    async def one(req: BenchRequest) -> dict[str, Any]:
        delay = req.arrival_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        return dict(await submit(req, t0 + req.arrival_s))

    rows = await asyncio.gather(*(one(r) for r in work))
    return list(rows), time.perf_counter() - t0


async def run_plain(settings_path: str, work: list[BenchRequest]) -> dict[str, Any]:
    """Plain vLLM AsyncLLM with the same engine arguments and priorities."""
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from pio_vllm.engine.vllm_backend import build_engine_args, resolve_model
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    for k, v in settings.vllm_env.items():
        os.environ[k] = v
    llm = AsyncLLM.from_engine_args(build_engine_args(settings, resolve_model(settings)))

    async def submit(req: BenchRequest, t_arrival: float) -> dict[str, Any]:
        params = SamplingParams(max_tokens=req.max_tokens, ignore_eos=True, temperature=0.0)
        ttft, n = None, 0
        async for out in llm.generate({"prompt": PROMPT.format(req.text)}, params,
                                      req.request_id, priority=req.level):
            n = len(out.outputs[0].token_ids)
            if ttft is None and n:
                ttft = time.perf_counter() - t_arrival
        return {"request_id": req.request_id, "priority_class": req.priority_class,
                "ok": True, "ttft_s": ttft, "output_tokens": n,
                "e2e_s": time.perf_counter() - t_arrival}

    try:
        await _warmup_plain(llm)
        rows, wall = await _replay(work, submit)
    finally:
        llm.shutdown()
    return summarise(rows, wall) | {"rows": rows}


async def _warmup_plain(llm: Any) -> None:
    from vllm import SamplingParams

    async for _ in llm.generate({"prompt": PROMPT.format("warm up")},
                                SamplingParams(max_tokens=4), "warmup"):
        pass


async def run_pio(settings_path: str, work: list[BenchRequest]) -> dict[str, Any]:
    """PioEngine with the same settings (admission, preemption as configured)."""
    from pio_vllm.engine.pio_engine import PioEngine
    from pio_vllm.errors import PioError
    from pio_vllm.request import PioRequest
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    async with PioEngine(settings) as engine:
        async def submit(req: BenchRequest, t_arrival: float) -> dict[str, Any]:
            ttft, n, pre = None, 0, 0
            try:
                async for out in engine.generate(PioRequest(
                        prompt=PROMPT.format(req.text), raw_prompt=True,
                        priority=req.priority_class, request_id=req.request_id,
                        sampling={"max_tokens": req.max_tokens, "ignore_eos": True,
                                  "temperature": 0.0})):
                    n += len(out.token_ids)
                    if ttft is None and out.token_ids:
                        ttft = time.perf_counter() - t_arrival
                    if out.result is not None:
                        pre = out.result.preemptions
                ok, error = True, None
            except PioError as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            return {"request_id": req.request_id, "priority_class": req.priority_class,
                    "ok": ok, "ttft_s": ttft, "output_tokens": n, "preemptions": pre,
                    "e2e_s": time.perf_counter() - t_arrival, "error": error}

        await engine.complete(PioRequest(prompt="warm up", sampling={"max_tokens": 4}))
        rows, wall = await _replay(work, submit)
        admission = engine.stats().admission
    result = summarise(rows, wall) | {"rows": rows}
    if admission is not None:
        result["admission_window"] = admission.window
    return result


def run_side_subprocess(side: str, settings_path: str, workload_path: Path,
                        out_path: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter and return its JSON."""
    cmd = [sys.executable, "-m", "benchmarks.harness", "--side", side, "--config",
           settings_path, "--workload", str(workload_path), "--out", str(out_path)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    print(f"  running {side} side ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(out_path.read_text())
    return data


def write_workload(work: list[BenchRequest], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in work))


def read_workload(path: Path) -> list[BenchRequest]:
    return [BenchRequest(**json.loads(line)) for line in path.read_text().splitlines() if line]


def environment(settings_path: str) -> dict[str, Any]:
    import platform

    import torch
    import vllm

    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(settings_path)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "vllm": vllm.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "engine_args": settings.engine, "admission": settings.admission.model_dump(),
        "git_commit": commit or None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _main() -> None:
    ap = argparse.ArgumentParser(description="run one side of an A/B benchmark")
    ap.add_argument("--side", choices=["plain", "pio"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workload", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    work = read_workload(a.workload)
    runner = run_plain if a.side == "plain" else run_pio
    result = asyncio.run(runner(a.config, work))
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    _main()
    # vLLM leaves non-daemon threads in some shutdown paths; the result is written.
    sys.stdout.flush()
    os._exit(0)
