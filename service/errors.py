"""Errors every surface maps to a message (kept free of torch so the light commands start fast)."""


class WeightsError(RuntimeError):
    """Weights are missing or wrong; the message says which file and where it should be."""
