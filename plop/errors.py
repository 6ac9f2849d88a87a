"""Every error plop raises for input the user can fix: one line, saying what went wrong and what to do.

The CLI turns exactly these (plus ``OSError`` and ``KeyboardInterrupt``) into one line on stderr and
exit code 2; anything else is a bug and keeps its traceback. The subclasses that are also
``ValueError`` keep the Python API's contract that bad arguments raise ``ValueError``.
"""

from __future__ import annotations


class PlopError(Exception):
    """An input problem the user can fix. The CLI prints it on one line and exits with 2."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} ({hint})")
        self.hint = hint


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line, for errors that wrap a library's (which may be empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class ConfigError(PlopError, ValueError):
    """A setting out of range (diagnosis or training)."""


class ReportError(PlopError, ValueError):
    """A report file that cannot be read: the message says which field and why."""


class DataError(PlopError, ValueError):
    """Task data that cannot be read or turned into text."""


class ModelError(PlopError):
    """A model that cannot be found, loaded or diagnosed."""


class NonFiniteError(PlopError, ValueError):
    """A module produced a non-finite norm (overflow in fp16, NaN weights, ...)."""


class FileError(PlopError):
    """A file plop cannot read or write as asked; the one-line message names the path."""


class UnsafeRegexError(ConfigError):
    """A regex plop refuses to use: invalid, too long, or liable to backtrack catastrophically."""


class FieldTypeError(DataError):
    """A data field that should hold text holds something else (a list, a number, ...)."""
