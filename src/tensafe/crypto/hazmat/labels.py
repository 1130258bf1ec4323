"""Validation of caller-supplied domain-separation labels and contexts."""

from __future__ import annotations

from typing import Final

from tensafe.crypto.errors import CryptoUsageError

__all__ = ["context_bytes", "label_bytes"]

_PREFIX: Final = "tensafe/"


def label_bytes(label: str, *, what: str = "label") -> bytes:
    """Return a domain-separation label as bytes after checking its form.

    A label MUST be printable ASCII without spaces, start with ``tensafe/`` and be at
    most 255 bytes, for example ``"tensafe/dek-wrap/v1"``.

    Raises:
        CryptoUsageError: The label does not have that form.
    """
    if not isinstance(label, str):
        raise CryptoUsageError(f"the {what} must be a str such as 'tensafe/<purpose>/v1'")
    if (
        not label.startswith(_PREFIX)
        or len(label) <= len(_PREFIX)
        or len(label) > 255
        or not all(0x21 <= ord(c) <= 0x7E for c in label)
    ):
        raise CryptoUsageError(
            f"the {what} must be printable ASCII, start with 'tensafe/' and be at most 255 bytes"
        )
    return label.encode("ascii")


def context_bytes(context: str) -> bytes:
    """Return a signature context as UTF-8 after checking it is 1 to 255 bytes.

    Raises:
        CryptoUsageError: The context is not a str, is empty or is too long.
    """
    if not isinstance(context, str):
        raise CryptoUsageError("the signature context must be a str")
    try:
        raw = context.encode("utf-8")
    except UnicodeEncodeError:
        raise CryptoUsageError("the signature context must be valid Unicode") from None
    if not 1 <= len(raw) <= 255:
        raise CryptoUsageError("the signature context must be 1 to 255 bytes of UTF-8")
    return raw
