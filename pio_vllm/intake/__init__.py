"""Multimodal intake (frontend process): images and prompts turned into vLLM inputs."""
