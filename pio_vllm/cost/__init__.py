"""Cost model (pure code, no vLLM import): what a request costs the engine."""
