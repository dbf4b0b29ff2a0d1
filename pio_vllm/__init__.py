"""pio-vllm."""
