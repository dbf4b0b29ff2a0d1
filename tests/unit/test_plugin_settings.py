"""The plugin's settings and requests without an engine: where settings come from, the
seed's request fields, in-line image processing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pio_vllm.errors import ConfigError, InvalidRequestError
from pio_vllm.intake.image_loader import ImageLoader
from pio_vllm.plugin import Qwen3VLPlugin, build_request, default_config_for_device
from pio_vllm.request import RequestResult
from pio_vllm.settings import ImageSettings
from tests.helpers import TINY_CONFIG, encode, noise_image


def test_settings_come_from_the_path_then_pio_config_then_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = Qwen3VLPlugin()
    monkeypatch.delenv("PIO_CONFIG", raising=False)
    by_device = plugin._settings(None, {})
    assert by_device.model == "Qwen/Qwen3-VL-2B-Instruct"
    assert default_config_for_device().name.startswith("qwen3-vl-2b-instruct-")
    monkeypatch.setenv("PIO_CONFIG", str(TINY_CONFIG))
    assert plugin._settings(None, {}).model == "pio:tiny"
    assert plugin._settings(None, {"model_seed": 3}).model_seed == 3
    assert Qwen3VLPlugin(config_path=TINY_CONFIG)._settings(None, {}).model == "pio:tiny"
    with pytest.raises(ConfigError, match="not initialized"):
        _ = plugin.model
    with pytest.raises(ConfigError, match="accepted: True or False"):
        plugin.initialize(enable_async_multimodal_processing="yes")  # type: ignore[arg-type]


def test_seed_request_fields_and_every_pio_request_field() -> None:
    seen: list[RequestResult] = []
    img = noise_image(32, 32, 1)
    request = build_request({"text": "hi", "image": img, "max_tokens": 5,
                             "priority": "batch", "on_complete": seen.append,
                             "metadata": {"job": 1}, "timeout_s": 3.0,
                             "sampling": {"temperature": 0.5}})
    assert request.prompt == "hi" and list(request.images) == [img]
    assert request.sampling == {"temperature": 0.5, "max_tokens": 5}
    assert request.on_complete is not None and request.priority == "batch"
    assert build_request({"text": "x", "image": [img, img]}).images == [img, img]
    with pytest.raises(InvalidRequestError, match="unknown request field.*'colour'"):
        build_request({"text": "x", "colour": "red"})
    with pytest.raises(InvalidRequestError, match="`text` or `prompt`"):
        build_request({"text": "x", "prompt": "y"})


async def test_in_line_image_processing_runs_on_the_calling_thread(tmp_path: Path) -> None:
    """enable_async_multimodal_processing=False (images.decode_off_loop: false) decodes on
    the event loop's thread instead of pio's pool."""
    png = encode(noise_image(40, 30, 2))
    threads: list[str] = []
    for off_loop in (True, False):
        loader = ImageLoader(ImageSettings(decode_off_loop=off_loop, cache_max_entries=0))
        original = loader._decode

        def spy(*args, original=original):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread().name)
            return original(*args)

        loader._decode = spy  # type: ignore[method-assign]
        out = await loader.load(png)
        assert out.image.size == (40, 30)
        await loader.aclose()
    assert threads[0].startswith("pio-image") and threads[1] == threading.main_thread().name
