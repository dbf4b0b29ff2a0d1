"""The engine stage (frontend process): PioEngine and its adapter to vLLM's AsyncLLM."""
