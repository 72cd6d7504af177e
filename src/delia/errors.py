"""Errors that the CLI turns into a clear message and a non-zero exit instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class DeliaError(Exception):
    """A problem the user can fix (bad input, missing model, wrong option). Exit code 2."""

    exit_code = 2


class DataError(DeliaError):
    """A bad record: names the file, the line (1-based) or row index, and the field."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ):
        self.path = str(path)
        self.line = line
        self.row = row
        self.field = field
        self.message = message
        self.reason = reason
        super().__init__(str(self))

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.row is not None:
            return f"{self.path}[row {self.row}]"
        return self.path

    def __str__(self) -> str:
        field = f" field '{self.field}':" if self.field else ""
        return f"{self.where}:{field} {self.message}"


class ModelNotFoundError(DeliaError):
    """The model name, folder or file cannot be resolved to a loadable model."""
