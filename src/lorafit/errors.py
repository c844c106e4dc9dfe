"""The project's own exception types.

Every error caused by the user's input (a config, a data file, a predictions file) is a
`LorafitError` carrying where it happened, so the CLI can print one readable line and exit 2
instead of a traceback.
"""
from __future__ import annotations


class LorafitError(Exception):
    """Bad input: names the file, line and field it concerns, when known."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file + (f":{self.line}" if self.line is not None else ""))
        elif self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.message


class ConfigError(LorafitError):
    """The training config (YAML or overrides) is invalid."""


class DataError(LorafitError):
    """A data file cannot be read or has an invalid record."""


class RunError(LorafitError):
    """A run folder is missing or lacks what a command needs."""


class TrainingError(LorafitError):
    """Training cannot go on (e.g. repeated non-finite losses); never leaves a broken adapter."""
