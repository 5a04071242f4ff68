"""Errors a user can fix without reading a traceback.

Anything raised as a `PipelineError` is printed by the command-line entry points as
one line (`error: ...`) with a non-zero exit code; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A failure caused by the user's input or environment, explained in one line."""

    exit_code = 1


class ConfigError(PipelineError, ValueError):
    """A config value that cannot work, e.g. `optimizer.lr must be > 0. Received: -1.0`."""

    exit_code = 2


class DatasetError(PipelineError):
    """A dataset that is unknown, not prepared, or cannot be prepared here."""

    exit_code = 2


class DivergenceError(PipelineError):
    """Training produced a non-finite value (or a gradient spike the config forbids),
    e.g. `non-finite output in layer 'dense_1' at step 57 (epoch 2)`."""


class TrainingInterrupted(PipelineError):
    """SIGINT or SIGTERM stopped training after a checkpoint; `resume=RUN_ID` continues it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """`error`'s message with every run of whitespace (newlines included) made one space,
    cut to `limit` characters: for a log line, a tag or an error message that quotes it."""
    return " ".join(str(error).split())[:limit]
