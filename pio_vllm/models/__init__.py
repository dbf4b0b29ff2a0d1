"""Model plugins at the seed's import paths (`pio_vllm.models.<model>.plugin`)."""
