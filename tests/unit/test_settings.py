"""PioSettings: sources, precedence and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pio_vllm.errors import ConfigError
from pio_vllm.settings import PioSettings
from tests.helpers import TINY_CONFIG


def test_tiny_config_loads_engine_args_verbatim() -> None:
    s = PioSettings.load(TINY_CONFIG)
    assert s.engine["model"] == "pio:tiny"
    assert s.engine["block_size"] == 32
    assert s.engine["limit_mm_per_prompt"] == {"image": 4, "video": 0}
    assert s.vllm_env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert s.local_model_preset() == "tiny"


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen3-vl-2b-instruct-cpu.yaml",
                                  "qwen3-vl-2b-instruct-h100.yaml"])
def test_every_shipped_config_validates(name: str) -> None:
    s = PioSettings.load(TINY_CONFIG.parent / name)
    for key in ("max_model_len", "block_size", "enable_prefix_caching", "limit_mm_per_prompt",
                "scheduling_policy", "mm_processor_cache_gb"):
        assert key in s.engine, f"{name} does not spell out {key}"
    assert s.engine["scheduling_policy"] == "priority"


def test_precedence_overrides_then_env_then_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIO_ENGINE__MAX_NUM_SEQS", "3")
    monkeypatch.setenv("PIO_IMAGES__DECODE_WORKERS", "5")
    s = PioSettings.load(TINY_CONFIG)
    assert s.engine["max_num_seqs"] == 3  # env beats file, decoded from the string "3"
    assert s.engine["block_size"] == 32  # file values the env did not touch stay
    assert s.images.decode_workers == 5
    s2 = PioSettings.load(TINY_CONFIG, images={"decode_workers": 7})
    assert s2.images.decode_workers == 7  # explicit keyword beats env


def test_pio_config_env_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIO_CONFIG", str(TINY_CONFIG))
    assert PioSettings.load().engine["model"] == "pio:tiny"


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PioSettings.load(tmp_path / "nope.yaml")


def test_unknown_field_is_rejected_by_name(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine: {model: pio:tiny}\nimagez: {}\n")
    with pytest.raises(ConfigError, match="imagez"):
        PioSettings.load(cfg)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("tuning", "step_budget", True), ("tuning", "step_budget_s", 0.2),
    ("tuning", "step_budget_fraction", 0.25), ("tuning", "step_profile", "tiny-cpu"),
    ("admission", "cheap_first_factor", 2.0)])
def test_a_removed_setting_is_refused_with_why(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.{key} was removed with .*ablation"):
        PioSettings.load(None, **{section: {key: value}})


def test_bad_values_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="decode_workers"):
        PioSettings.load(TINY_CONFIG, images={"decode_workers": 0})
    with pytest.raises(ConfigError, match="default_priority_class 'gold'"):
        PioSettings.load(TINY_CONFIG, default_priority_class="gold")
    with pytest.raises(ConfigError, match="max-num-seqs"):
        PioSettings.load(TINY_CONFIG, engine={"model": "x", "max-num-seqs": 4})
    no_model = tmp_path / "no-model.yaml"
    no_model.write_text("engine: {max_num_seqs: 4}\n")
    with pytest.raises(ConfigError, match="engine.model is required"):
        PioSettings.load(no_model)


def test_priority_classes_follow_vllm_order() -> None:
    s = PioSettings.load(TINY_CONFIG)
    levels = {name: c.level for name, c in s.priority_classes.items()}
    assert levels["interactive"] < levels["standard"] < levels["batch"]


def test_unknown_vllm_engine_argument_is_a_config_error() -> None:
    from pio_vllm.engine.vllm_backend import build_engine_args

    s = PioSettings.load(TINY_CONFIG, engine={"model": "pio:tiny", "max_num_seqz": 4})
    with pytest.raises(ConfigError, match="max_num_seqz"):
        build_engine_args(s, "/tmp/model")


def test_pio_log_level_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from pio_vllm.settings import pio_log_level

    monkeypatch.delenv("PIO_LOG_LEVEL", raising=False)
    assert pio_log_level(default="INFO") == logging.INFO
    monkeypatch.setenv("PIO_LOG_LEVEL", "debug")
    assert pio_log_level() == logging.DEBUG
    monkeypatch.setenv("PIO_LOG_LEVEL", "loud")
    with pytest.raises(ConfigError, match="PIO_LOG_LEVEL='LOUD' is not a log level; accepted"):
        pio_log_level()
