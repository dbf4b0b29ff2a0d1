"""The local Qwen3-VL builder: deterministic per seed, real config and processor files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pio_vllm.model_builder import PRESETS, build_model, is_built


@pytest.mark.slow
def test_same_seed_same_checkpoint_other_seed_differs(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    a = build_model(tmp_path / "a", seed=3)
    b = build_model(tmp_path / "b", seed=3)
    c = build_model(tmp_path / "c", seed=4)
    assert a["special_token_ids"] == b["special_token_ids"]
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    wc = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa if wa[k].ndim > 1)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json").read_text()
    assert c["seed"] == 4


def test_tiny_checkpoint_files(tiny_model_dir: Path) -> None:
    assert is_built(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["head_dim"]) == (2, 128, 64)
    assert vision["patch_size"] == 16 and vision["spatial_merge_size"] == 2
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg["image_token_id"] == specials["<|image_pad|>"]
    assert cfg["vision_start_token_id"] == specials["<|vision_start|>"]


def test_2b_preset_matches_qwen3_vl_2b_instruct() -> None:
    p = PRESETS["qwen3-vl-2b"]
    assert (p.text_hidden_size, p.text_layers, p.text_heads, p.text_kv_heads, p.head_dim) == (
        2048, 28, 16, 8, 128)
    assert p.vocab_size == 151936
    assert (p.vision_depth, p.vision_hidden_size) == (24, 1024)
    assert p.deepstack_visual_indexes == (5, 11, 17)


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a pio-built checkpoint"):
        build_model(tmp_path)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model(tmp_path / "x", preset="huge")


@pytest.mark.slow
def test_a_second_builder_waits_for_the_first(tmp_path: Path) -> None:
    """Replicas started together each build on first use: a second builder waits on the
    directory's lock (held here) and then builds a complete checkpoint, never a mix of two."""
    import fcntl
    import subprocess
    import sys

    out = tmp_path / "tiny-seed0"
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
              "from pio_vllm.model_builder import build_model; build_model(sys.argv[1])")
    with open(tmp_path / "tiny-seed0.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)],
                                stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "waiting for another process's build" in first, first
        assert not out.exists() and not (tmp_path / "tiny-seed0.partial").exists()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert is_built(out) and (out / "tokenizer.json").is_file()


def test_an_incomplete_build_is_built_again(tmp_path: Path) -> None:
    out = tmp_path / "m"
    build_model(out)
    (out / "tokenizer.json").unlink()
    assert not is_built(out)
    build_model(out)
    assert is_built(out)
