"""Errors every surface maps to a message (kept free of torch so the light commands start fast)."""


class WeightsError(RuntimeError):
    """Weights are missing or wrong; the message says which file and where it should be."""


class RequestError(ValueError):
    """A request the engine cannot serve. Carries the field, so every surface can name it in its own shape
    (HTTP 422 `loc`, a Cog failed prediction, a CLI message) without parsing the text."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
