"""Typed errors. Library code raises these; only the CLI turns them into text and exit codes.

Every :class:`BadInputError` is the user's to fix (exit code 2) and carries a one-line
message plus a hint. Anything else escaping the library is an internal error (exit code 1).
"""

from __future__ import annotations

from typing import Any


class PruneCliError(Exception):
    """Base class of every error prune-cli raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, always
        return self.message.replace("\n", " ")


class BadInputError(PruneCliError):
    """The user's input is wrong: exit code 2."""

    exit_code = 2


class ModelNotFoundError(BadInputError):
    pass


class UnsupportedArchitectureError(BadInputError):
    pass


class RecipeError(BadInputError):
    """A recipe (YAML or CLI flags) has an unknown key or an invalid value."""


class UnknownNameError(RecipeError):
    """An unknown method / option name (with a 'did you mean')."""


class PatternError(BadInputError):
    """A sparsity pattern is malformed or does not fit a layer."""


class NotEnoughTextError(BadInputError):
    pass


class OutputExistsError(BadInputError):
    pass


class CheckpointError(BadInputError):
    """A checkpoint folder is missing files or is not one prune-cli can read."""


class BackendUnavailableError(BadInputError):
    """An explicitly requested backend cannot run here."""


class NonFiniteError(BadInputError):
    """NaN or +-inf in weights, calibration activations or statistics, named where it first appears."""


class OutputLockedError(BadInputError):
    """Another live run holds the lock on the same --output."""


class StdoutError(BadInputError):
    """stdout cannot take the results: closed, on a full device, or a pipe whose reader left."""


class InterruptedRun(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread so every ``finally`` runs."""

    def __init__(self, signal_name: str = "SIGINT", exit_code: int = 130):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code
        self.at_block_boundary = False  # set when the stop was deferred to the end of a block


def kind_of(value: Any) -> str:
    """How a wrongly typed recipe value is named in an error: "a list", "an integer", "null"."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "a list"), (dict, "a mapping")):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"
