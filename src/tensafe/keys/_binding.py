"""What a wrapped key is bound to: the context every KEK provider authenticates with it.

A wrapped DEK in ``tenant_deks`` (or the wrapped sealing key of a deployment key) is
only valid in its own row: each provider binds the blob to a *context*, a
domain-separated encoding of provider-independent facts about the row, and unwrapping
under any other context fails. A database writer who copies tenant A's wrapped DEK into
tenant B's row (or into another version's row) therefore gets an unwrap error instead
of B's data being encrypted under A's key.

Encoding (``docs/security/keys.md``, "Binding"), with ``lp(x) = u16_be(len(x)) || x``::

    context = lp("tensafe/key-binding/v1") || lp(purpose) || lp(field_1) || ... || lp(field_n)

    tenant DEK:      purpose "tenant-dek",     fields UTF-8(tenant id), u32_be(DEK version)
    deployment key:  purpose "deployment-key", fields UTF-8(name), UTF-8(key id)

Every field is length-prefixed, so no two different rows share an encoding.
"""

from __future__ import annotations

from typing import Final

from tensafe.keys.errors import KeyManagementError

__all__ = ["BINDING_LABEL", "dek_context", "deployment_key_context"]

#: Version label of the context encoding; a new encoding gets a new label.
BINDING_LABEL: Final = b"tensafe/key-binding/v1"
_PURPOSE_DEK: Final = b"tenant-dek"
_PURPOSE_DEPLOYMENT_KEY: Final = b"deployment-key"
_MAX_FIELD: Final = 0xFFFF


def _lp(field: bytes) -> bytes:
    if len(field) > _MAX_FIELD:
        raise KeyManagementError("a key-binding field is longer than 65535 bytes")
    return len(field).to_bytes(2, "big") + field


def _encode(purpose: bytes, *fields: bytes) -> bytes:
    return b"".join(_lp(part) for part in (BINDING_LABEL, purpose, *fields))


def dek_context(*, tenant: str, version: int) -> bytes:
    """The binding context of a tenant's DEK ``version`` (1 to 2**32 - 1)."""
    if not tenant:
        raise KeyManagementError("a DEK binding needs a tenant id")
    if isinstance(version, bool) or not 1 <= version <= 0xFFFFFFFF:
        raise KeyManagementError("a DEK version must be between 1 and 2**32 - 1")
    return _encode(_PURPOSE_DEK, tenant.encode("utf-8"), version.to_bytes(4, "big"))


def deployment_key_context(*, name: str, key_id: str) -> bytes:
    """The binding context of the sealing key of deployment key ``name`` with ``key_id``."""
    if not name or not key_id:
        raise KeyManagementError("a deployment-key binding needs a name and a key id")
    return _encode(_PURPOSE_DEPLOYMENT_KEY, name.encode("utf-8"), key_id.encode("utf-8"))
