"""The exception tree of :mod:`tensafe.package` (TSSP).

Every failure to build, parse, verify or open a package raises a subclass of
:class:`PackageError`; parsers of untrusted input raise nothing else. Messages never contain key
material or plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensafe.errors import TenSafeError

__all__ = [
    "NotARecipientError",
    "PackageDecryptionError",
    "PackageError",
    "PackageExpiredError",
    "PackageFormatError",
    "PackageInputError",
    "PackageStateError",
    "PolicyDeniedError",
    "RollbackError",
    "SignatureVerificationError",
    "UntrustedSignerError",
]


class PackageError(TenSafeError):
    """Root of the TSSP error tree."""


class PackageFormatError(PackageError):
    """The bytes are not a well-formed TSSP v1 package (or not one at all)."""

    exit_code = 3


class SignatureVerificationError(PackageError):
    """A signature in the package does not verify (either half of a hybrid signature)."""

    exit_code = 4


class UntrustedSignerError(PackageError):
    """Too few of the package's signers are in the verifier's trust store."""

    exit_code = 4


class PackageExpiredError(PackageError):
    """The package's expiry time has passed."""

    exit_code = 5


class RollbackError(PackageError):
    """The package is older than (or re-uses the version of) one already accepted under its name."""

    exit_code = 5


class PolicyDeniedError(PackageError):
    """The admission policy denied the package.

    Attributes:
        reasons: Every deny message the policy produced.
    """

    exit_code = 6

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons: tuple[str, ...] = tuple(reasons)
        super().__init__("policy denied the package: " + "; ".join(self.reasons))

    def __reduce__(self) -> tuple[type[PolicyDeniedError], tuple[tuple[str, ...]]]:
        return (type(self), (self.reasons,))


class NotARecipientError(PackageError):
    """The given recipient key is not one of the package's recipients."""

    exit_code = 7


class PackageDecryptionError(PackageError):
    """The payload or the content key failed to decrypt, or a decrypted file does not match the manifest.

    The message is deliberately the same for every cause.
    """

    exit_code = 7


class PackageInputError(PackageError):
    """Bad input to pack/unpack/verify (missing directory, symlink, existing output, bad key file)."""

    exit_code = 2


class PackageStateError(PackageError):
    """The rollback state file is unreadable or corrupt (it is never silently reset)."""

    exit_code = 2
