"""`pio-vllm bench calibrate`: fit a simulator profile from a real engine's step records.

    pio-vllm bench calibrate --config FILE --out configs/profiles/NAME.json [--name NAME]

Runs PioEngine in-process on a calibration workload that spreads the step shapes (text
prompts of 16 to 2000 tokens alone and in batches, one image of each size alone, images in
pairs, decode batches of 1 to max_num_seqs requests), reads every engine step the scheduler
measured (patches/batch_limit_scheduler.py: scheduled tokens, vision tokens encoded, the
sum of each image's tokens squared, seconds) and fits

    step_s = base + per_token * tokens + per_vision * vision + per_vision_sq * sum(image^2)

by least squares with non-negative terms (`fit_nonnegative`, BatchTuner's fit: a term whose
slope comes out negative is dropped and the rest refitted), keeping the residual factors
(actual/predicted, at 101 quantiles) so simulated steps keep the real tails. Preparation
time is fitted the same way from each request's intake time (`RequestTimings.intake_s`)
against its vision tokens. The profile JSON says what it was fitted on in its `source`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import cpu_model
from pio_vllm.sim.profile import SimProfile
from pio_vllm.tuning.batch_tuner import fit_nonnegative

SIZES = ((224, 224), (448, 336), (640, 480), (1344, 1008))


def fit_profile(name: str, samples: list[tuple[int, int, int, float, int]],
                prep: list[tuple[int, float]], device: str) -> tuple[SimProfile, float]:
    """The profile of `samples` (steps) and `prep` ((vision tokens, intake seconds))."""
    s = np.array(samples, dtype=float)
    tokens, vision, seconds, vision_sq = s[:, 0], s[:, 1], s[:, 3], s[:, 4]
    base, slopes, r2 = fit_nonnegative(
        {"tokens": tokens, "vision": vision, "vision_sq": vision_sq}, seconds)
    pred = base + slopes["tokens"] * tokens + slopes["vision"] * vision + (
        slopes["vision_sq"] * vision_sq)
    factors = seconds / np.maximum(pred, 1e-6)
    residuals = tuple(float(q) for q in np.quantile(factors, np.linspace(0, 1, 101)))
    p = np.array(prep, dtype=float) if prep else np.zeros((0, 2))
    prep_base, prep_slopes, _ = fit_nonnegative({"vision": p[:, 0]}, p[:, 1]) if len(
        p) >= 4 else (0.0, {"vision": 0.0}, 0.0)
    profile = SimProfile(
        name=name, source=f"fitted: pio-vllm bench calibrate, {len(samples)} steps, R^2 "
        f"{r2:.3f}, {device}",
        base_s=round(base, 7), per_token_s=round(slopes["tokens"], 9),
        per_vision_token_s=round(slopes["vision"], 9),
        per_vision_token_sq_s=round(slopes["vision_sq"], 12),
        prep_base_s=round(prep_base, 6), prep_per_vision_token_s=round(prep_slopes["vision"], 9),
        residuals=tuple(round(r, 4) for r in residuals))
    return profile, r2


def _image(w: int, h: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


async def _calibrate(config: Path, name: str) -> tuple[SimProfile, float, int]:
    from pio_vllm.engine.pio_engine import PioEngine
    from pio_vllm.request import PioRequest
    from pio_vllm.settings import PioSettings

    settings = PioSettings.load(config)
    samples: list[tuple[int, int, int, float, int]] = []
    prep: list[tuple[int, float]] = []
    seed = iter(range(10_000, 20_000))
    async with PioEngine(settings) as engine:
        if engine.tuning is not None:
            await engine.tuning.pause()  # its rounds would take the samples
        if engine.admission is not None:
            engine.admission.set_work_model(None)  # capacity only: nothing rationed
        backend = engine.backend

        async def collect() -> None:
            result = await backend.batch_limits(None, None, None)
            samples.extend(tuple(x) for x in result.get("samples", ()))  # type: ignore[misc]

        async def wave(requests: list[PioRequest]) -> None:
            results = await engine.generate_batch(requests)
            failed = [r.error for r in results if not r.ok]
            if failed:
                raise RuntimeError(f"calibration request failed: {failed[0]}")
            prep.extend((r.vision_tokens, r.timings.intake_s) for r in results
                        if r.timings.intake_s is not None)
            await collect()

        def req(words: int, tokens: int, size: tuple[int, int] | None = None) -> PioRequest:
            images = [] if size is None else [_image(*size, next(seed))]
            return PioRequest(prompt="the " * words, images=images,
                              sampling={"max_tokens": tokens, "ignore_eos": True})

        await collect()  # drop the start-up's steps
        seqs = backend.max_num_seqs
        plan: list[list[PioRequest]] = []
        for words in (16, 200, 800, 2000):  # text prefill, alone and in batches
            plan += [[req(words, 8)], [req(words, 8) for _ in range(4)]]
        for size in SIZES:  # one image alone, then two at once
            plan += [[req(16, 8, size)] for _ in range(3)]
            plan.append([req(16, 8, size) for _ in range(2)])
        for batch in sorted({1, 2, 4, seqs}):  # decode batches
            plan.append([req(16, 64) for _ in range(batch)])
        plan.append([req(32, 32, SIZES[i % len(SIZES)]) for i in range(seqs)])  # mixed
        for i, requests in enumerate(plan):
            print(f"[calibrate {i + 1}/{len(plan)}] {len(requests)} request(s)",
                  file=sys.stderr, flush=True)
            await wave(requests)
    device = f"cpu ({cpu_model()})"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    profile, r2 = fit_profile(name, samples, prep, device)
    return profile, r2, len(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pio-vllm bench calibrate",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"))
    ap.add_argument("--name", default=None, help="profile name (default: the out file's stem)")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV space the simulated engine gets (default: the config's)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    name = a.name or a.out.stem
    profile, r2, steps = asyncio.run(_calibrate(a.config, name))
    if a.kv_cache_gib is not None:
        from dataclasses import replace

        profile = replace(profile, kv_cache_gib=a.kv_cache_gib)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(profile.to_json())
    print(json.dumps({k: v for k, v in json.loads(profile.to_json()).items()
                      if k != "residuals"}, indent=1))
    print(f"wrote {a.out}: {steps} steps, R^2 {r2:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
