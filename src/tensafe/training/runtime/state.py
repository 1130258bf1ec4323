"""Versioned, self-describing serialization of a training session.

Format ``tensafe-lora-session/v1`` is one safetensors file:

* tensors ``lora/<parameter name>`` (float32): the trainable LoRA weights, bit-exact;
* with the optimizer, ``adam/<parameter name>/{exp_avg,exp_avg_sq,step}``;
* in ``server_poisson`` mode, the registered data set packed as ``data/tokens`` and
  ``data/token_offsets`` (int64) plus, for every loss input key ``K``, ``data/in/K`` (values,
  flattened and concatenated) and ``data/in_offsets/K`` (int64, N+1 element offsets);
* the safetensors metadata holds ``format`` (``"tensafe-lora-session"``), ``version``
  (``"1"``), ``digest`` (see below) and ``header``, a JSON object: base model id and
  SHA-256 revision, LoRA settings, step count, the DP policy and budget state (or the
  non-private marker), optimizer hyper-parameters, and the per-example shapes of the data set.

``digest`` is the lower-case hex SHA-256 of ``b"tensafe-lora-session/v1\\0"``, the UTF-8
``header`` string, then for every tensor in name order its name, dtype, shape (JSON) and
raw little-endian bytes, each followed by a NUL byte. It detects accidental corruption; it is
not a MAC (the server's AEAD encryption provides integrity against tampering).

Readers refuse another ``format``, an unknown ``version`` and any malformed header with
:class:`~tensafe.training.runtime.errors.StateFormatError`. The blob holds model weights and
possibly training data: the server encrypts it before it is stored.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

from tensafe.training.runtime.errors import StateFormatError

__all__ = ["STATE_FORMAT", "STATE_VERSION", "decode_state", "encode_state"]

STATE_FORMAT = "tensafe-lora-session"
STATE_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


#: safetensors dtype codes of the tensor types a session state holds.
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a contiguous CPU tensor, without copying."""
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


def _shape_json(shape: torch.Size) -> str:
    """``json.dumps(list(shape))`` for a tensor shape (ints only), without the encoder's overhead."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _digest_items(header_json: str, items: list[tuple[str, torch.Tensor, memoryview]]) -> str:
    """The v1 digest over ``(name, contiguous tensor, raw bytes)`` in name order."""
    h = hashlib.sha256(b"tensafe-lora-session/v1\0")
    h.update(header_json.encode("utf-8") + b"\0")
    for name, t, raw in items:
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{_shape_json(t.shape)}\0".encode())
        h.update(raw)
        h.update(b"\0")
    return h.hexdigest()


def _digest(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    items = []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        items.append((name, t, _raw(t)))
    return _digest_items(header_json, items)


def encode_state(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize ``header`` (JSON-ready) and ``tensors`` into one safetensors blob.

    The safetensors container is written here directly (8-byte header length, JSON header
    padded to 8 bytes, tensors back to back in name order): one copy of each tensor into
    the output and one hashing pass, instead of the several copies of
    ``safetensors.torch.save``. The reader is the safetensors library itself.
    """
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    items: list[tuple[str, torch.Tensor, memoryview]] = []
    entries: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise StateFormatError(f"cannot serialize tensor {name!r} of dtype {t.dtype}")
        raw = _raw(t)
        items.append((name, t, raw))
        entries[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
    metadata = {
        "format": STATE_FORMAT,
        "version": str(STATE_VERSION),
        "digest": _digest_items(header_json, items),
        "header": header_json,
    }
    st_header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    st_header += b" " * (-len(st_header) % 8)
    # One allocation and one copy of each tensor (this machine class copies at ~1-2 GB/s).
    return b"".join([struct.pack("<Q", len(st_header)), st_header, *(raw for _, _, raw in items)])


def decode_state(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse a blob written by :func:`encode_state`.

    Raises:
        StateFormatError: If the blob is not a v1 session state.
    """
    from safetensors.torch import load

    if not isinstance(data, bytes | bytearray | memoryview):
        raise StateFormatError("session state must be bytes")
    raw = bytes(data)
    if len(raw) < 8:
        raise StateFormatError("session state is truncated")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise StateFormatError("session state is truncated or not a safetensors file")
    try:
        st_header = json.loads(raw[8 : 8 + n])
        metadata = st_header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise StateFormatError("session state is not a safetensors file") from None
    if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT:
        raise StateFormatError(f"not a TenSafe session state (expected format {STATE_FORMAT!r})")
    if metadata.get("version") != str(STATE_VERSION):
        raise StateFormatError(
            f"session state version {metadata.get('version')!r} is not supported; this TenSafe reads "
            f"version {STATE_VERSION}"
        )
    header_json = metadata.get("header")
    if not isinstance(header_json, str):
        raise StateFormatError("session state header is missing")
    try:
        tensors = load(raw)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise StateFormatError(f"session state tensors are corrupt: {type(exc).__name__}") from None
    if metadata.get("digest") != _digest(header_json, tensors):
        raise StateFormatError("session state is corrupt (digest mismatch)")
    try:
        header = json.loads(header_json)
    except ValueError:
        raise StateFormatError("session state header is not JSON") from None
    if not isinstance(header, dict):
        raise StateFormatError("session state header must be a JSON object")
    return header, tensors
