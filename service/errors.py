"""Errors every surface maps to a message (kept free of torch so the light commands start fast)."""

import re

# Server paths (/a/b, C:\a\b), not the path of a URL (https://host/a/b) nor a relative one.
PATH_LIKE = re.compile(r"(?<![\w.:/\\-])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"]+){2,}[\\/]?")


class WeightsError(RuntimeError):
    """Weights are missing or wrong; the message says which file and where it should be."""


class RequestError(ValueError):
    """A request the engine cannot serve. Carries the field, so every surface can name it in its own shape
    (HTTP 422 `loc`, a Cog failed prediction, a CLI message) without parsing the text."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @property
    def public_reason(self) -> str:
        """The reason as an anonymous caller may read it: server file paths replaced by <path>."""
        return PATH_LIKE.sub("<path>", self.reason)
