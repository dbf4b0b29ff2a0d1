"""Batch tuning: cost per request and the per-step limits it implies (pure code)."""
