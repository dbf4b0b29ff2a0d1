"""Build random-weight Qwen3-VL checkpoints locally (runs in the caller's process, no vLLM).

No weights can be downloaded on the machines pio is developed and tested on, so tests, the demo
and CPU benchmarks use a checkpoint built here: the real Qwen3-VL architecture
(`Qwen3VLForConditionalGeneration`), a byte-level BPE tokenizer trained locally with the Qwen
special tokens, a chat template, and a `Qwen2VLImageProcessor` preprocessor config. vLLM and
transformers load it exactly as they load a downloaded Qwen3-VL.

Presets:
- ``tiny``: 2 text layers, hidden 128, 4 heads of dim 64 (the CPU attention backend has no
  head size 16), 2 KV heads, 2 vision blocks; float32 so vLLM and transformers agree token for
  token under greedy decoding. Weights are scaled up from the usual 0.02 so that the greedy
  output depends on the prompt and on the image pixels instead of collapsing to one token.
- ``qwen3-vl-2b``: the Qwen3-VL-2B-Instruct shapes (hidden 2048, 28 layers, 16 heads, 8 KV
  heads, head_dim 128, vocab 151936, vision depth 24 / hidden 1024 / out 2048, deepstack
  [5, 11, 17]) in bfloat16, for GPU benchmarks; serving speed does not depend on weight values
  when output lengths are fixed.

The build is deterministic for a seed: same seed, same tokenizer and same weights.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Marker file: written last, so with the files below it means a complete checkpoint.
BUILD_INFO_FILE = "pio_build_info.json"
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "preprocessor_config.json")

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# A Qwen-style chat template. Content is a string or a list of parts; image parts (OpenAI
# "image_url" or Qwen "image") become one vision placeholder each, which vLLM's Qwen3-VL
# processor expands to the image's vision tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or item['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}\n"
)

_CORPUS_WORDS = (
    "the", "a", "an", "image", "picture", "photo", "shows", "show", "cat", "dog", "bird",
    "red", "blue", "green", "yellow", "black", "white", "describe", "what", "is", "in",
    "this", "of", "on", "with", "and", "or", "sky", "tree", "car", "person", "house",
    "street", "noise", "pixels", "colour", "color", "texture", "random", "pattern",
    "briefly", "please", "caption", "small", "large", "bright", "dark", "left", "right",
    "top", "bottom", "centre", "center", "there", "are", "two", "three", "many", "one",
    "stripe", "square", "circle", "line", "background", "foreground", "light", "shadow",
    "water", "grass", "road", "building", "window", "door", "table", "chair",
)


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of one preset. Sizes are those of Qwen3VLConfig's fields."""

    name: str
    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    vocab_size: int | None  # None: the tokenizer's size rounded up to a multiple of 64
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_heads: int
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int
    dtype: str
    init_std: float
    max_position_embeddings: int


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny", text_hidden_size=128, text_intermediate_size=256, text_layers=2,
        text_heads=4, text_kv_heads=2, head_dim=64, mrope_section=(12, 10, 10), vocab_size=None,
        vision_depth=2, vision_hidden_size=128, vision_intermediate_size=256, vision_heads=2,
        deepstack_visual_indexes=(1,), num_position_embeddings=2304, dtype="float32",
        # 0.02 makes every prompt decode to the same token; at 0.3 the logits are peaked
        # enough that greedy output follows the prompt and the pixels (tested).
        init_std=0.3, max_position_embeddings=32768,
    ),
    "qwen3-vl-2b": ModelPreset(
        name="qwen3-vl-2b", text_hidden_size=2048, text_intermediate_size=6144, text_layers=28,
        text_heads=16, text_kv_heads=8, head_dim=128, mrope_section=(24, 20, 20),
        vocab_size=151936, vision_depth=24, vision_hidden_size=1024,
        vision_intermediate_size=4096, vision_heads=16, deepstack_visual_indexes=(5, 11, 17),
        num_position_embeddings=2304, dtype="bfloat16", init_std=0.02,
        max_position_embeddings=262144,
    ),
}


def _train_tokenizer(out_dir: Path, seed: int) -> tuple[dict[str, Any], int]:
    """Train a small byte-level BPE with the Qwen special tokens; save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_CORPUS_WORDS) for _ in range(24)) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return ids, len(hf_tok)


def _build_config(preset: ModelPreset, ids: dict[str, int], tokenizer_len: int) -> Any:
    from transformers import Qwen3VLConfig

    vocab = preset.vocab_size or ((tokenizer_len + 63) // 64) * 64
    if vocab < tokenizer_len:
        raise ValueError(f"preset {preset.name!r}: vocab {vocab} < tokenizer size {tokenizer_len}")
    if sum(preset.mrope_section) * 2 != preset.head_dim:
        raise ValueError(
            f"preset {preset.name!r}: mrope_section {preset.mrope_section} must sum to "
            f"head_dim/2 = {preset.head_dim // 2}"
        )
    cfg = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": preset.text_hidden_size,
            "intermediate_size": preset.text_intermediate_size,
            "num_hidden_layers": preset.text_layers,
            "num_attention_heads": preset.text_heads,
            "num_key_value_heads": preset.text_kv_heads,
            "head_dim": preset.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": preset.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": list(preset.mrope_section),
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": True,
            "dtype": preset.dtype,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": preset.vision_depth,
            "hidden_size": preset.vision_hidden_size,
            "intermediate_size": preset.vision_intermediate_size,
            "num_heads": preset.vision_heads,
            "in_channels": 3,
            "hidden_act": "gelu_pytorch_tanh",
            "out_hidden_size": preset.text_hidden_size,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": preset.num_position_embeddings,
            "deepstack_visual_indexes": list(preset.deepstack_visual_indexes),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.dtype = preset.dtype
    return cfg


def _build_weights(cfg: Any, preset: ModelPreset, seed: int, device: str) -> Any:
    """Instantiate without per-module init, then fill each tensor from one seeded generator."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    dtype = getattr(torch, preset.dtype)
    torch.manual_seed(seed)
    with torch.device(device), no_init_weights():
        model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 or "norm" in name:  # RMSNorm / LayerNorm scales
                param.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
                param.copy_(noise.mul_(preset.init_std))
    model.tie_weights()
    return model.to("cpu")


def _write_processor_files(out_dir: Path, ids: dict[str, int]) -> None:
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        # min/max pixels of Qwen3-VL-2B-Instruct's own preprocessor config
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "processor_class": "Qwen3VLProcessor",
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (out_dir / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2)
    )
    generation = {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def is_built(model_dir: str | Path) -> bool:
    """True when `model_dir` holds a checkpoint finished by `build_model`."""
    d = Path(model_dir)
    return all((d / name).is_file() for name in (BUILD_INFO_FILE, *_CHECKPOINT_FILES))


def build_model(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a random-weight Qwen3-VL checkpoint to `out_dir` and return its build info.

    Existing complete checkpoints are kept unless `overwrite`. The directory is written under a
    temporary name and renamed at the end, so an interrupted build never looks complete.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; accepted: {sorted(PRESETS)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One build per directory at a time: replicas started together (`pio-vllm serve-replicas`)
    # each build on first use, and two builders sharing the `.partial` directory left a
    # checkpoint without its tokenizer.
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's build of %s", out)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(out, preset, seed, device, overwrite)


def _build_locked(out: Path, preset: str, seed: int, device: str,
                  overwrite: bool) -> dict[str, Any]:
    spec = PRESETS[preset]
    if is_built(out) and not overwrite:
        info: dict[str, Any] = json.loads((out / BUILD_INFO_FILE).read_text())
        return info
    own = (out / BUILD_INFO_FILE).is_file()  # an earlier build of pio's, files missing
    if out.exists() and any(out.iterdir()) and not own and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not a pio-built checkpoint; pass overwrite=True "
            "(--overwrite) or choose an empty directory"
        )
    if own and not overwrite:
        logger.warning("%s is an incomplete pio build; building it again", out)
    import shutil

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    logger.info("building %s Qwen3-VL checkpoint (seed %d) in %s", preset, seed, out)
    ids, tokenizer_len = _train_tokenizer(tmp, seed)
    cfg = _build_config(spec, ids, tokenizer_len)
    model = _build_weights(cfg, spec, seed, device)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(tmp), max_shard_size="5GB")
    _write_processor_files(tmp, ids)
    info = {
        "preset": preset,
        "seed": seed,
        "params": n_params,
        "dtype": spec.dtype,
        "tokenizer_len": tokenizer_len,
        "special_token_ids": ids,
        "build_s": round(time.perf_counter() - t0, 2),
    }
    (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("built %s (%d params) in %.1fs", out, n_params, info["build_s"])
    return info
