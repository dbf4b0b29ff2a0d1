"""The seed's plugin facade, started through its own initialize() on the tiny model."""

from __future__ import annotations

import pytest

from pio_vllm.errors import ConfigError, EmptyPromptError, InvalidRequestError
from pio_vllm.plugin import create_qwen3_vl_2b_instruct_plugin
from pio_vllm.request import RequestOutcome
from tests.helpers import TINY_CONFIG, assert_vllm_idle, noise_image

pytestmark = [pytest.mark.engine, pytest.mark.slow]


async def test_plugin_single_and_batch_requests() -> None:
    plugin = create_qwen3_vl_2b_instruct_plugin(config_path=TINY_CONFIG)
    with pytest.raises(ConfigError, match="not initialized"):
        _ = plugin.model
    with pytest.raises(ConfigError, match="enable_async_multimodal_processing=False"):
        plugin.initialize(enable_async_multimodal_processing=False)
    model = plugin.initialize(enable_async_multimodal_processing=True,
                              sampling_defaults={"max_tokens": 8, "temperature": 0.0})
    try:
        assert plugin.model is model and plugin._model is model
        img = noise_image(200, 150, 4)
        one = await model.async_process_multimodal_request(
            text="describe", image=img, priority="interactive", metadata={"job": 7})
        assert one.ok and one.output_tokens > 0 and one.vision_tokens > 0
        assert one.priority_class == "interactive" and one.metadata == {"job": 7}
        assert one.timings.ttft_s is not None and one.timings.ttft_s > 0
        batch = await model.async_process_batch_multimodal_requests([
            {"text": "describe", "image": img},
            {"text": "hello there"},
            {"text": ""},
        ])
        assert [r.outcome for r in batch] == [RequestOutcome.FINISHED, RequestOutcome.FINISHED,
                                              RequestOutcome.FAILED]
        assert batch[0].token_ids == one.token_ids  # same greedy request, same tokens
        assert batch[1].vision_tokens == 0
        assert isinstance(batch[2].error, EmptyPromptError)
        with pytest.raises(InvalidRequestError, match="unknown request field"):
            await model.async_process_multimodal_request(text="x", colour="red")
        await assert_vllm_idle(model.engine)
    finally:
        await plugin.shutdown()
