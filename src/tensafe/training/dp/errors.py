"""Errors raised by the DP-SGD engine.

:class:`DPError` derives from :class:`tensafe.training.errors.TrainingError`, so the CLI
reports every one of them as a single line and a non-zero exit status.
"""

from __future__ import annotations

from tensafe.training.errors import TrainingError

__all__ = ["DPConfigError", "DPError", "UnsupportedParameterError"]


class DPError(TrainingError):
    """Root of every error raised by :mod:`tensafe.training.dp`."""


class DPConfigError(DPError, ValueError):
    """A DP-SGD setting is invalid (noise multiplier, clip norm, sample rate, seed, ...)."""

    exit_code = 2


class UnsupportedParameterError(DPError):
    """A trainable parameter has no exact per-example gradient path.

    The engine refuses such a model rather than compute a wrong (non-private) gradient.
    The message names the parameter and says how to fix the configuration.
    """

    exit_code = 2
