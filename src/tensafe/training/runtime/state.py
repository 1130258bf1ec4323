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

:class:`SessionSnapshot` is the blob as plain values: :func:`encode_snapshot` writes it and
:func:`decode_snapshot` reads it back (every header key and tensor name lives in this
module); :class:`~tensafe.training.runtime.session.LoraTrainingSession` only takes and
applies snapshots.

Readers refuse another ``format``, an unknown ``version`` and any malformed header with
:class:`~tensafe.training.runtime.errors.StateFormatError`. The blob holds model weights and
possibly training data: the server encrypts it before it is stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tensafe.privacy import DpPolicy, DpPolicyError
from tensafe.training.runtime.errors import StateFormatError
from tensafe.training.runtime.types import Datum

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "AdamSnapshot",
    "DpSnapshot",
    "EncodedState",
    "SessionSnapshot",
    "decode_snapshot",
    "decode_state",
    "encode_snapshot",
    "encode_snapshot_parts",
    "encode_state",
    "encode_state_parts",
]

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


class EncodedState:
    """A serialized state as its segments: the safetensors header, then each tensor's bytes.

    The tensor segments are views of the snapshot's tensors, not copies: the bytes are
    copied once, by whoever consumes them (:meth:`reader` into an encryptor's buffers, or
    :meth:`tobytes`). The tensors must therefore not change until the state is consumed
    (the server's committer guarantees it: see :mod:`tensafe.server.durability`).
    """

    __slots__ = ("_segments", "nbytes")

    def __init__(self, segments: list[bytes | memoryview]) -> None:
        """Wrap ``segments`` (consumed in order)."""
        self._segments = tuple(memoryview(seg).cast("B") for seg in segments)
        #: Total size of the blob in bytes.
        self.nbytes = sum(seg.nbytes for seg in self._segments)

    def __repr__(self) -> str:
        return f"EncodedState(nbytes={self.nbytes}, segments={len(self._segments)})"

    def tobytes(self) -> bytes:
        """The blob as one ``bytes`` object (one copy of every segment)."""
        return b"".join(self._segments)

    def reader(self) -> io.BufferedIOBase:
        """A binary stream over the blob whose ``readinto`` copies straight from the segments."""
        return _SegmentReader(self._segments)


class _SegmentReader(io.BufferedIOBase):
    """Sequential reads over a tuple of byte views (no intermediate buffer)."""

    def __init__(self, segments: tuple[memoryview, ...]) -> None:
        super().__init__()
        self._segments = segments
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < out.nbytes and self._index < len(self._segments):
            seg = self._segments[self._index]
            n = min(seg.nbytes - self._offset, out.nbytes - filled)
            out[filled : filled + n] = seg[self._offset : self._offset + n]
            filled += n
            self._offset += n
            if self._offset == seg.nbytes:
                self._index, self._offset = self._index + 1, 0
        return filled

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = sum(seg.nbytes for seg in self._segments[self._index :]) - self._offset
        buf = bytearray(size)
        n = self.readinto(buf)
        return bytes(buf[:n])

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)


def encode_state_parts(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EncodedState:
    """Serialize ``header`` (JSON-ready) and ``tensors`` into one safetensors blob, as segments.

    The safetensors container is written here directly (8-byte header length, JSON header
    padded to 8 bytes, tensors back to back in name order), without copying the tensors: one
    hashing pass for the digest, and the returned :class:`EncodedState` refers to the
    tensors' memory. The reader is the safetensors library itself.
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
    return EncodedState([struct.pack("<Q", len(st_header)) + st_header, *(raw for _, _, raw in items)])


def encode_state(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """:func:`encode_state_parts` as one ``bytes`` object."""
    return encode_state_parts(header, tensors).tobytes()


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


# --------------------------------------------------------------------------- session snapshots


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamSnapshot:
    """AdamW hyper-parameters and the moments of every parameter that has them.

    Attributes:
        moments: Parameter name -> ``(exp_avg, exp_avg_sq, step)`` in parameter order; ``step``
            as the optimizer keeps it (a 0-d tensor).
    """

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    moments: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSnapshot:
    """The DP state of a session whose engine is set up (σ, N, budget, engine, drawn batch).

    Attributes:
        secure_rng: Whether the noise came from the OS CSPRNG (``None`` when not recorded).
        drawn: The indices of the batch drawn for the current step (``server_poisson``); a
            reload must not redraw it.
    """

    dataset_size: int
    noise_multiplier: float
    budget: dict[str, Any]
    engine: dict[str, Any]
    secure_rng: bool | None
    drawn: list[int] | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionSnapshot:
    """Everything a ``tensafe-lora-session/v1`` blob holds, as plain values.

    Attributes:
        weights: LoRA parameter name -> tensor, in the model's parameter order.
        noise_seed: Seed of deterministic noise; ``None`` with CSPRNG noise (or without DP).
        policy: The DP policy; ``None`` for a non-private session.
        dp: The DP state; ``None`` without a policy, or in ``server_poisson`` mode before the
            data set is registered.
        optimizer: ``None`` when saved without the optimizer.
        dataset: The registered data set (``server_poisson``), else ``None``.
    """

    base_model_id: str
    base_model_revision: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    flags: dict[str, bool]
    weights: dict[str, torch.Tensor]
    step: int
    examples_seen: int
    noise_seed: int | None
    policy: DpPolicy | None
    dp: DpSnapshot | None
    optimizer: AdamSnapshot | None
    dataset: list[Datum] | None


_LORA_FLAGS = ("train_mlp", "train_attn", "train_unembed")


def encode_snapshot(snapshot: SessionSnapshot) -> bytes:
    """Serialize ``snapshot`` as a ``tensafe-lora-session/v1`` blob (see the module docstring)."""
    return encode_snapshot_parts(snapshot).tobytes()


def encode_snapshot_parts(snapshot: SessionSnapshot) -> EncodedState:
    """:func:`encode_snapshot` as segments that refer to the snapshot's tensors (no copies)."""
    s = snapshot
    tensors: dict[str, torch.Tensor] = {f"lora/{n}": t for n, t in s.weights.items()}
    optimizer: dict[str, Any] | None = None
    if s.optimizer is not None:
        opt = s.optimizer
        optimizer = {
            "type": "adamw",
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
            "has_state": list(opt.moments),
        }
        for n, (exp_avg, exp_avg_sq, step) in opt.moments.items():
            tensors[f"adam/{n}/exp_avg"] = exp_avg
            tensors[f"adam/{n}/exp_avg_sq"] = exp_avg_sq
            tensors[f"adam/{n}/step"] = torch.as_tensor(step, dtype=torch.float32).reshape(1)
    dp_header: dict[str, Any] | None = None
    if s.policy is not None:
        dp_header = {"policy": s.policy.to_dict(), "setup": None}
        if s.dp is not None:
            dp_header["setup"] = {
                "dataset_size": s.dp.dataset_size,
                "noise_multiplier": s.dp.noise_multiplier,
                "budget": s.dp.budget,
                "engine": s.dp.engine,
                "secure_rng": s.dp.secure_rng,
                # The step's drawn batch is durable: a reload must not redraw it.
                "drawn": None if s.dp.drawn is None else list(s.dp.drawn),
            }
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "base_model": {"id": s.base_model_id, "revision": s.base_model_revision},
        "lora": {
            "rank": s.rank,
            "alpha": s.alpha,
            "target_modules": list(s.target_modules),
            **s.flags,
        },
        "parameters": list(s.weights),
        "step": s.step,
        "examples_seen": s.examples_seen,
        # Deterministic noise is reproducible from this seed (0 when none was given).
        "noise_seed": s.noise_seed,
        "dp": dp_header,
        "optimizer": optimizer,
        "dataset": _pack_dataset(s.dataset, tensors),
    }
    return encode_state_parts(header, tensors)


def decode_snapshot(data: bytes) -> SessionSnapshot:
    """Parse a blob written by :func:`encode_snapshot` (digest checked by :func:`decode_state`).

    Raises:
        StateFormatError: If the blob is not a well-formed v1 session state.
        DpPolicyError: If the saved DP policy is invalid.
    """
    header, tensors = decode_state(data)
    try:
        return _parse_snapshot(header, tensors)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        if isinstance(exc, StateFormatError | DpPolicyError):
            raise
        raise StateFormatError(f"session state is malformed ({type(exc).__name__}: {exc})") from None


def _parse_snapshot(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> SessionSnapshot:
    if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
        raise StateFormatError("session state header has the wrong format or version")
    dp_header = header["dp"]
    policy = DpPolicy.from_dict(dp_header["policy"]) if dp_header is not None else None
    dp: DpSnapshot | None = None
    if dp_header is not None and dp_header["setup"] is not None:
        setup = dp_header["setup"]
        drawn = setup.get("drawn")
        secure = setup.get("secure_rng")
        dp = DpSnapshot(
            dataset_size=int(setup["dataset_size"]),
            noise_multiplier=float(setup["noise_multiplier"]),
            budget=setup["budget"],
            engine=setup["engine"],
            secure_rng=None if secure is None else bool(secure),
            drawn=None if drawn is None else [int(i) for i in drawn],
        )
    opt = header["optimizer"]
    optimizer: AdamSnapshot | None = None
    if opt is not None:
        optimizer = AdamSnapshot(
            lr=float(opt["lr"]),
            betas=(float(opt["betas"][0]), float(opt["betas"][1])),
            eps=float(opt["eps"]),
            weight_decay=float(opt["weight_decay"]),
            moments={
                str(n): (
                    tensors[f"adam/{n}/exp_avg"],
                    tensors[f"adam/{n}/exp_avg_sq"],
                    tensors[f"adam/{n}/step"].reshape(()),
                )
                for n in opt["has_state"]
            },
        )
    lora = header["lora"]
    saved_model = header["base_model"]
    seed = header.get("noise_seed", header.get("seed"))
    return SessionSnapshot(
        base_model_id=str(saved_model["id"]),
        base_model_revision=str(saved_model["revision"]),
        rank=int(lora["rank"]),
        alpha=float(lora["alpha"]),
        target_modules=tuple(lora["target_modules"]),
        flags={k: bool(lora[k]) for k in _LORA_FLAGS},
        weights={str(n): tensors[f"lora/{n}"] for n in header["parameters"]},
        step=int(header["step"]),
        examples_seen=int(header["examples_seen"]),
        noise_seed=None if seed is None else int(seed),
        policy=policy,
        dp=dp,
        optimizer=optimizer,
        dataset=_unpack_dataset(header["dataset"], tensors) if header["dataset"] is not None else None,
    )


def _pack_dataset(dataset: list[Datum] | None, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Add the registered data set's tensors to ``tensors``; return its header (``None`` without one)."""
    if dataset is None:
        return None
    tokens = [np.asarray(d.model_input, dtype=np.int64) for d in dataset]
    tensors["data/tokens"] = torch.from_numpy(np.concatenate(tokens))
    tensors["data/token_offsets"] = torch.from_numpy(
        np.cumsum([0, *[len(t) for t in tokens]]).astype(np.int64)
    )
    keys = sorted({k for d in dataset for k in d.loss_fn_inputs})
    shapes: dict[str, list[list[int] | None]] = {}
    dtypes: dict[str, str] = {}
    for key in keys:
        arrays = [d.loss_fn_inputs.get(key) for d in dataset]
        kinds = {np.asarray(a).dtype.kind for a in arrays if a is not None}
        dtype = np.int64 if kinds <= {"i", "u"} else np.float32
        dtypes[key] = "int64" if dtype is np.int64 else "float32"
        flat = [
            np.asarray(a, dtype=dtype).reshape(-1) if a is not None else np.zeros(0, dtype) for a in arrays
        ]
        shapes[key] = [list(np.asarray(a).shape) if a is not None else None for a in arrays]
        tensors[f"data/in/{key}"] = torch.from_numpy(np.concatenate(flat))
        tensors[f"data/in_offsets/{key}"] = torch.from_numpy(
            np.cumsum([0, *[f.size for f in flat]]).astype(np.int64)
        )
    return {"size": len(dataset), "keys": keys, "shapes": shapes, "dtypes": dtypes}


def _unpack_dataset(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> list[Datum]:
    """The data set that :func:`_pack_dataset` stored."""
    size = int(header["size"])
    tokens = tensors["data/tokens"].numpy()
    offs = tensors["data/token_offsets"].numpy()
    if offs.shape != (size + 1,):
        raise StateFormatError("session state data set offsets are inconsistent")
    inputs: list[dict[str, np.ndarray]] = [{} for _ in range(size)]
    for key in header["keys"]:
        values = tensors[f"data/in/{key}"].numpy()
        koffs = tensors[f"data/in_offsets/{key}"].numpy()
        for i, shape in enumerate(header["shapes"][key]):
            if shape is not None:
                inputs[i][key] = values[koffs[i] : koffs[i + 1]].reshape(shape).copy()
    return [
        Datum(model_input=[int(t) for t in tokens[offs[i] : offs[i + 1]]], loss_fn_inputs=inputs[i])
        for i in range(size)
    ]
