"""The seed's plugin module path: `from pio_vllm.models.qwen3_vl_2b.plugin import
create_qwen3_vl_2b_instruct_plugin` (frontend process; see pio_vllm/plugin.py)."""

from pio_vllm.plugin import (
    Qwen3VLModel,
    Qwen3VLPlugin,
    create_qwen3_vl_2b_instruct_plugin,
)

__all__ = ["Qwen3VLModel", "Qwen3VLPlugin", "create_qwen3_vl_2b_instruct_plugin"]
