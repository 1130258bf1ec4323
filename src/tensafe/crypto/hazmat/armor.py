"""ASCII armor for keys: PEM-like text with a version and algorithm header.

Layout (LF line endings, see docs/spec/crypto.md)::

    -----BEGIN TENSAFE HYBRID SIGNING KEY-----
    Version: 1
    Algorithm: ed25519+ml-dsa-65

    <canonical base64 of the binary encoding, 64 characters per line>
    -----END TENSAFE HYBRID SIGNING KEY-----

Parsers accept CRLF line endings and surrounding whitespace, and reject
everything else: unknown or missing headers, non-canonical base64, lines longer
than 64 characters, text after the END line, and inputs over :data:`MAX_ARMOR_LEN`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from tensafe.crypto.errors import KeyFormatError

__all__ = ["MAX_ARMOR_LEN", "ArmorBlock", "armor", "dearmor"]

#: Largest armored input a parser looks at (bytes).
MAX_ARMOR_LEN: Final = 64 * 1024
_LINE: Final = 64
_DASHES: Final = "-----"


class ArmorBlock:
    """A parsed armored block: its type line, header values and decoded payload."""

    __slots__ = ("algorithm", "kind", "payload", "version")

    def __init__(self, kind: str, version: int, algorithm: str, payload: bytes) -> None:
        self.kind = kind
        self.version = version
        self.algorithm = algorithm
        self.payload = payload

    def __repr__(self) -> str:
        # The payload may be a private key: never show it.
        return f"ArmorBlock(kind={self.kind!r}, version={self.version}, algorithm={self.algorithm!r})"


def armor(kind: str, *, version: int, algorithm: str, payload: bytes) -> bytes:
    """Armor a binary encoding.

    Args:
        kind: The block type, for example ``"TENSAFE HYBRID SIGNING KEY"``.
        version: The format version written in the ``Version`` header.
        algorithm: The algorithm name written in the ``Algorithm`` header.
        payload: The binary encoding.

    Returns:
        The armored text, ASCII, ending with a newline.
    """
    b64 = base64.b64encode(payload).decode("ascii")
    lines = [f"{_DASHES}BEGIN {kind}{_DASHES}", f"Version: {version}", f"Algorithm: {algorithm}", ""]
    lines += [b64[i : i + _LINE] for i in range(0, len(b64), _LINE)]
    lines.append(f"{_DASHES}END {kind}{_DASHES}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _fail(reason: str) -> KeyFormatError:
    return KeyFormatError(f"malformed armored key: {reason}")


def dearmor(data: bytes | bytearray | memoryview | str, *, kinds: frozenset[str]) -> ArmorBlock:
    """Parse an armored block strictly.

    Args:
        data: The armored text.
        kinds: The block types the caller accepts.

    Returns:
        The parsed block.

    Raises:
        KeyFormatError: The text is not a well-formed block of an accepted type.
    """
    if isinstance(data, str):
        try:
            raw = data.encode("ascii")
        except UnicodeEncodeError:
            raise _fail("not ASCII") from None
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise KeyFormatError("a serialized key must be bytes")
    if len(raw) > MAX_ARMOR_LEN:
        raise _fail("input too large")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _fail("not ASCII") from None
    lines = text.strip().replace("\r\n", "\n").split("\n")
    if len(lines) < 6:
        raise _fail("too short")
    begin, end = lines[0], lines[-1]
    if not (begin.startswith(f"{_DASHES}BEGIN ") and begin.endswith(_DASHES) and len(begin) > 16):
        raise _fail("missing BEGIN line")
    kind = begin[len(_DASHES) + 6 : -len(_DASHES)]
    if kind not in kinds:
        raise KeyFormatError(f"wrong kind of key: expected {' or '.join(sorted(kinds))}, got {kind[:64]!r}")
    if end != f"{_DASHES}END {kind}{_DASHES}":
        raise _fail("missing or mismatched END line")
    version_line, alg_line, blank = lines[1], lines[2], lines[3]
    if not version_line.startswith("Version: ") or not alg_line.startswith("Algorithm: ") or blank != "":
        raise _fail("missing Version/Algorithm headers")
    version_text = version_line[len("Version: ") :]
    if not (version_text.isascii() and version_text.isdigit() and len(version_text) <= 3):
        raise _fail("bad Version header")
    body = lines[4:-1]
    if not body or any(len(line) > _LINE for line in body) or any(len(line) != _LINE for line in body[:-1]):
        raise _fail("bad base64 line lengths")
    b64 = "".join(body)
    try:
        payload = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _fail("invalid base64") from None
    if base64.b64encode(payload).decode("ascii") != b64:
        raise _fail("non-canonical base64")
    return ArmorBlock(kind, int(version_text), alg_line[len("Algorithm: ") :], payload)
