"""What the audit log needs from a signing key; it never knows where the key lives.

:class:`tensafe.crypto.signing.HybridSigningKey` and :class:`HybridVerifyingKey` satisfy
these protocols, and so does any other object with the same methods (an HSM- or
KMS-backed signer provided by :mod:`tensafe.keys`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["CheckpointSigner", "CheckpointVerifier"]


@runtime_checkable
class CheckpointVerifier(Protocol):
    """A public key that checks checkpoint signatures."""

    @property
    def key_id(self) -> str:
        """Stable identifier of the key (a hex fingerprint)."""
        ...

    def verify(self, signature: bytes, message: bytes, *, context: str) -> None:
        """Raise if ``signature`` is not a valid signature of ``message`` under ``context``."""
        ...


@runtime_checkable
class CheckpointSigner(Protocol):
    """A private key that signs checkpoints."""

    def sign(self, message: bytes, *, context: str) -> bytes:
        """Return a signature of ``message`` bound to the domain-separation ``context``."""
        ...

    def verifying_key(self) -> CheckpointVerifier:
        """Return the matching public key (its ``key_id`` is stored with each checkpoint)."""
        ...
