"""The ``TS_PQC_REQUIRED`` policy switch.

When the environment variable ``TS_PQC_REQUIRED`` is true, every classical-only
key, signature or encapsulation (an input whose algorithm identifier is in
:data:`~tensafe.crypto.hazmat.formats.CLASSICAL_ONLY_ALGS`) is refused with
:class:`~tensafe.crypto.errors.PQCRequiredError`. The variable is read on every
check, so a process can tighten the policy without restarting.
"""

from __future__ import annotations

import warnings

from tensafe import config
from tensafe.crypto.errors import ClassicalOnlyWarning, CryptoConfigurationError, PQCRequiredError

__all__ = ["ENV_PQC_REQUIRED", "enforce_pqc_policy", "pqc_required"]

ENV_PQC_REQUIRED = "TS_PQC_REQUIRED"


def pqc_required() -> bool:
    """Return whether ``TS_PQC_REQUIRED`` is set to a true value.

    Returns:
        True for ``1``, ``true``, ``yes`` or ``on`` (any case); False when the
        variable is unset, empty, ``0``, ``false``, ``no`` or ``off``.

    Raises:
        CryptoConfigurationError: The variable holds any other value. An unknown
            value is refused rather than guessed at, so a typo never weakens the policy.
    """
    try:
        return config.pqc_required()  # the one parser (tensafe.config)
    except config.EnvironmentVariableError as exc:
        raise CryptoConfigurationError(str(exc)) from None


def enforce_pqc_policy(what: str) -> None:
    """Refuse or warn about a classical-only object according to ``TS_PQC_REQUIRED``.

    Args:
        what: A short description of the object, used in the message (never secret).

    Raises:
        PQCRequiredError: ``TS_PQC_REQUIRED`` is true.
    """
    if pqc_required():
        raise PQCRequiredError(
            f"{what} is classical-only (no post-quantum component) and {ENV_PQC_REQUIRED}=true; "
            "use a hybrid key (the default of generate())"
        )
    warnings.warn(
        f"{what} is classical-only (no post-quantum component); set {ENV_PQC_REQUIRED}=true to refuse it",
        ClassicalOnlyWarning,
        stacklevel=3,
    )
