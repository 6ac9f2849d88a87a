"""User-facing errors: what went wrong and what to do, in one line."""

from __future__ import annotations


class PlopError(Exception):
    """An input problem the user can fix. The CLI prints it on one line and exits with 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.hint = hint
