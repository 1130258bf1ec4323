"""Guard against secrets and raw data in audit record details.

Audit details hold hashes, identifiers, counts and privacy spent — never secrets or raw
training data. :func:`check_details` is applied to every record before it is hashed.
It is a seat belt for obvious mistakes (a key named ``password`` or a PEM private key),
not a data-loss-prevention system: callers remain responsible for what they log.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from tensafe.audit.canonical import canonical_json
from tensafe.audit.errors import AuditError

__all__ = ["MAX_DETAILS_BYTES", "check_details"]

#: Largest canonical encoding of a record's details (bytes).
MAX_DETAILS_BYTES = 16 * 1024

# A key is split into lower-case words (snake_case, kebab-case, dotted and camelCase).
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")

#: Words that make a key look secret on their own.
_SECRET_WORDS = frozenset(
    {"password", "passwd", "passphrase", "secret", "token", "credential", "credentials", "pwd", "pin"}
)
#: Adjacent word pairs that make a key look secret (``api_key``, ``key_material``, ...).
_SECRET_PAIRS = frozenset(
    {
        ("api", "key"),
        ("key", "material"),
        ("private", "key"),
        ("secret", "key"),
        ("access", "key"),
        ("signing", "key"),
        ("session", "key"),
        ("raw", "key"),
        ("plaintext", "key"),
    }
)
#: Single words that are compound spellings of the pairs above.
_SECRET_COMPOUNDS = frozenset({"apikey", "privatekey", "secretkey", "accesskey", "keymaterial"})

_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def _words(key: str) -> list[str]:
    return [w.lower() for w in _WORD_SPLIT.split(key) if w]


def _secret_looking(key: str) -> bool:
    words = _words(key)
    if any(w in _SECRET_WORDS or w in _SECRET_COMPOUNDS for w in words):
        return True
    return any((a, b) in _SECRET_PAIRS for a, b in itertools.pairwise(words))


def _walk(value: Any, path: str, depth: int) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit details keys must be strings (at {path or 'top level'})")
            where = f"{path}.{key}" if path else key
            if _secret_looking(key):
                raise AuditError(
                    f"audit details key {where!r} looks like a secret; log a hash or an identifier "
                    "instead, under a name that does not suggest a secret"
                )
            _walk(item, where, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, str):
        if _PEM_PRIVATE.search(value):
            raise AuditError(f"audit details value at {path!r} holds a PEM private key; refusing to log it")
    elif isinstance(value, bytes | bytearray | memoryview):
        raise AuditError(
            f"audit details value at {path!r} is raw bytes; log a hash (hex) or an identifier instead"
        )


def check_details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate record details and return them as a plain dict.

    Args:
        details: A JSON object (see :mod:`tensafe.audit.canonical` for allowed values),
            or None for an empty object.

    Returns:
        A shallow copy as a dict.

    Raises:
        AuditError: A key looks like a secret (``password``, ``api_key``, ``secret``,
            ``token``, ``key_material``, ...), a value is raw bytes or a PEM private key,
            a value cannot be encoded canonically (floats included), or the encoding is
            larger than :data:`MAX_DETAILS_BYTES`.
    """
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise AuditError("audit details must be a JSON object (a mapping)")
    _walk(details, "", 0)
    encoded = canonical_json(details)
    if len(encoded) > MAX_DETAILS_BYTES:
        raise AuditError(
            f"audit details are {len(encoded)} bytes; at most {MAX_DETAILS_BYTES} are allowed "
            "(log hashes and identifiers, not data)"
        )
    return dict(details)
