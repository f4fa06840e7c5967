"""The one exception type that means "the user asked for something we cannot do".

The command line prints a `KimbhoError` as a single line and exits non-zero; any other
exception is a bug in Kimbho and keeps its traceback.
"""

from __future__ import annotations


class KimbhoError(ValueError):
    """A user mistake (bad path, bad config, mismatched files), stated in the user's words.

    It subclasses `ValueError` so that Python callers can catch the familiar type.
    """


class RequestError(KimbhoError):
    """A generation request that cannot be served, naming the `field` of the request at fault
    (`prompt`, `max_new_tokens`, `n`, `stop`, a sampling parameter), so that the server can
    answer a 400 that names its own parameter for it. The checks live in one place (`Request`,
    `SamplingParams`, `Engine.check`); every caller reads them."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ReportedElsewhere(KimbhoError):
    """A `KimbhoError` that another process of a multi-process run (rank 0) reports for all of
    them: this process exits with status 1 without repeating it (see `distributed.py`)."""
