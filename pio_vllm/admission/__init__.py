"""Priority admission in front of vLLM (frontend process): policy, controller, metrics."""
