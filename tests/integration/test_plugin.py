"""The seed's plugin API: its usage example runs unchanged (only the package name differs)
on the tiny model, in a fresh process with PIO_CONFIG naming the settings file (started
early, beside the session engine's start: tests/early_start.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.early_start import Early, EarlyStart, Job
from tests.helpers import ROOT, TINY_CONFIG, encode, noise_image

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# The seed's example; only the first import line names pio's package (inference_pio there).
SEED_EXAMPLE = '''
from pio_vllm.models.qwen3_vl_2b.plugin import create_qwen3_vl_2b_instruct_plugin
import asyncio


def on_done(result):
    print("callback:", result.request_id, result.outcome.value, result.output_tokens)


async def main():
    plugin = create_qwen3_vl_2b_instruct_plugin()
    plugin.initialize(enable_async_multimodal_processing=True)

    result = await plugin._model.async_process_multimodal_request(
        text="Describe this image.", image="path.jpg", on_complete=on_done)
    print("single:", result.text[:40].replace("\\n", " "), result.vision_tokens)

    results = await plugin._model.async_process_batch_multimodal_requests([
        {"text": "What is in this picture?", "image": "path.jpg"},
        {"text": "Write a haiku about the sea."},
    ])
    for r in results:
        print("batch:", r.outcome.value, r.vision_tokens, r.output_tokens)
    await plugin.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
'''


def seed_example_job(folder: Path) -> Job:
    (folder / "path.jpg").write_bytes(encode(noise_image(320, 240, seed=5), "JPEG"))
    (folder / "example.py").write_text(SEED_EXAMPLE)
    return Job([sys.executable, "example.py"], folder,
               {"PIO_CONFIG": str(TINY_CONFIG), "PYTHONPATH": str(ROOT),
                "VLLM_LOGGING_LEVEL": "WARNING"}, nice=10)


EARLY = {"seed-example": Early("test_seed_example_runs_unchanged", seed_example_job)}


def test_seed_example_runs_unchanged(early_start: EarlyStart) -> None:
    proc = early_start.result("seed-example")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    single = next(line for line in lines if line.startswith("single:"))
    assert single.endswith(" 80")  # 320x240 -> 80 vision tokens: the image reached vLLM
    callback = next(line.split() for line in lines if line.startswith("callback:"))
    assert callback[2] == "finished" and int(callback[3]) > 0
    batch = [line.split()[1:] for line in lines if line.startswith("batch:")]
    assert [(outcome, vision) for outcome, vision, _ in batch] == [("finished", "80"),
                                                                   ("finished", "0")]
    assert all(int(tokens) > 0 for _, _, tokens in batch)
