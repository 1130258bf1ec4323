"""Errors raised by the training domain (models, data, LoRA, DP-SGD).

Every class derives from :class:`TrainingError`, whose root is
:class:`tensafe.errors.TenSafeError`, so the CLI reports them as one line and a non-zero
exit status. Messages never quote raw training records: a malformed JSONL line is
identified by its file and line number only.
"""

from __future__ import annotations

from tensafe.errors import TenSafeError

__all__ = [
    "DataError",
    "EmptyDatasetError",
    "ModelLoadError",
    "TrainingConfigError",
    "TrainingError",
    "UnknownModelError",
]


class TrainingError(TenSafeError):
    """Root of every error raised by :mod:`tensafe.training`."""


class TrainingConfigError(TrainingError, ValueError):
    """A training setting is invalid (LoRA rank, target modules, batch sizes, ...)."""

    exit_code = 2


class UnknownModelError(TrainingError, LookupError):
    """A model name is neither in the registry nor a local Hugging Face model directory.

    TenSafe never downloads models; the message lists the names it knows.
    """

    exit_code = 2


class ModelLoadError(TrainingError):
    """A known model could not be loaded or converted (missing files, corrupt cache, ...)."""


class DataError(TrainingError, ValueError):
    """A dataset file is malformed.

    Attributes:
        path: The offending file, when known.
        line: The 1-based line number inside ``path``, when known.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception picklable (multiprocessing, Ray) despite keyword-only fields.
        return (_rebuild_data_error, (type(self), self.args[0], self.path, self.line))


def _rebuild_data_error(cls: type[DataError], text: str, path: str | None, line: int | None) -> DataError:
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.path = path
    err.line = line
    return err


class EmptyDatasetError(DataError):
    """A dataset holds no usable example (empty file, or every record was blank)."""
