"""Errors a user can fix. The CLI prints them without a traceback and exits non-zero."""

from __future__ import annotations


class EdgekdError(Exception):
    """Something the user can fix; `hint` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class RecipeError(EdgekdError):
    """A recipe key or value is wrong."""

    exit_code = 2


class DataError(EdgekdError):
    """A dataset is missing, empty or laid out in a way edgekd cannot read."""


class CheckpointError(EdgekdError):
    """A checkpoint is missing, foreign or does not fit the run."""
