"""pio's OpenAI-compatible server: vLLM's routes with PioEngine as the engine client."""
