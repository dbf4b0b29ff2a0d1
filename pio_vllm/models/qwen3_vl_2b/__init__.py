"""Qwen3-VL-2B-Instruct (the seed's `inference_pio.models.qwen3_vl_2b`)."""
