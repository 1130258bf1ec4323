"""Stability information recorded at sampling, and the provenance checks of ``stable_reinforce``.

**Recording.** An ``asample`` request with ``record_stability_info: true`` makes the worker
record, for each returned sequence, the prompt, the sampled tokens and the sampler's
log-probabilities (float32, exactly what the client received), under the sequence's
``sequence_id`` (``{sampling_session_id}:{seq_id}:{i}``, the ``sample_sequence_ids`` of
the ``asample`` answer). A record is a row of ``stability_records`` (migration
``0008_stability_records``) bound to the tenant and the sampling session, inserted in the
transaction that completes the sampling future; its data is sealed under the tenant's DEK
(``EncryptedArtifactStore.seal_bytes``, artifact id ``stability-<sha256(sequence_id)[:40]>``,
so a blob moved to another row or tenant does not open). Blob format ``TSSR`` v1, little
endian: ``b"TSSR" 0x01``, ``u32 P``, ``u32 T``, ``int32[P]`` prompt, ``int32[T]`` tokens,
``float32[T]`` log-probabilities.

**Retention.** A record is kept :data:`STABILITY_TTL_SECONDS` (one day, Tinker's documented
rule); every training request (``forward`` or ``forward_backward``) that uses it restarts the
day, in the transaction that completes that request. An expired record is refused at once;
:func:`tensafe.server.retention.sweep_expired_stability_records` deletes expired rows (one of
the server's retention sweeps).

**Provenance.** A datum may carry ``model_input_spans`` and ``loss_fn_input_spans`` (both or
neither; the wire decoder checks that they tile the input and the targets). Before a
``forward``/``forward_backward`` runs, :func:`resolve_provenance` checks every span against the
record it names:

* the sequence must be recorded, unexpired and the caller's tenant's (anything else is the
  same ``unknown or expired sequence_id`` error: another tenant's ids are not revealed);
* a span's ``[offset, offset + length)`` must lie within the recorded prompt or sampled tokens;
* the model-input tokens a span covers must equal the recorded tokens it names, and so must
  the targets of a ``sampled`` loss span; a ``prompt`` loss span's targets carry no loss and
  are not compared (the cookbook sends zeros there);
* the context of every sampled target must be the recorded one: the model input up to that
  position must end with the sequence's prompt followed by its sampled tokens before the target
  (otherwise the recorded log-probability is not the sampler's for that position).

For ``stable_reinforce`` the datum's ``logprobs`` input is then replaced by the **recorded**
log-probabilities at sampled positions (0 elsewhere; a client's numbers are ignored) and the
server adds ``sampled_mask`` (1 at sampled targets); a client cannot send ``sampled_mask``
itself. For the other losses the spans are only checked. Every quantity a datum's loss uses
comes from that datum's own spans, so under DP-SGD one example cannot influence another's
clipped gradient.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import ForeignKey, LargeBinary, String, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

import tensafe.db.models  # noqa: F401  (registers the tenants table the foreign key refers to)
from tensafe.db import Base, UTCDateTime, utcnow
from tensafe.protocol.wire import WireDatum, WireSpan
from tensafe.storage import EncryptedArtifactStore
from tensafe.training.runtime.errors import InvalidRequestError

__all__ = [
    "SERVER_DERIVED_INPUTS",
    "STABILITY_TTL_SECONDS",
    "RecordedSequence",
    "StabilityRecord",
    "decode_record",
    "encode_record",
    "refresh_records",
    "resolve_provenance",
    "seal_records",
    "sequence_ids",
    "store_records",
]

#: How long a recorded sequence is kept after sampling or after its last use in training.
STABILITY_TTL_SECONDS = 86400.0
#: ``loss_fn_inputs`` the server derives from provenance; a client that sends one is refused.
SERVER_DERIVED_INPUTS = ("sampled_mask",)
#: Rows deleted per sweep at most.
_MAGIC = b"TSSR\x01"
_HEADER = struct.Struct("<5sII")
_KIND = "stability-record"


class StabilityRecord(Base):
    """One sequence sampled with ``record_stability_info`` (migration ``0008_stability_records``)."""

    __tablename__ = "stability_records"

    id: Mapped[str] = mapped_column(String(320), primary_key=True)  # the sequence_id
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"))
    sampling_session_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[_dt.datetime] = mapped_column(UTCDateTime(), index=True)
    blob: Mapped[bytes] = mapped_column(LargeBinary())


@dataclass(frozen=True)
class RecordedSequence:
    """What was recorded for one sequence: its prompt, its tokens and the sampler's logprobs."""

    prompt: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray


def sequence_ids(sampling_session_id: str, seq_id: int, num_samples: int) -> list[str]:
    """The ``sample_sequence_ids`` of an ``asample`` request, in the order of its sequences."""
    return [f"{sampling_session_id}:{seq_id}:{i}" for i in range(num_samples)]


def _artifact_id(sequence_id: str) -> str:
    return "stability-" + hashlib.sha256(sequence_id.encode()).hexdigest()[:40]


def encode_record(prompt: Sequence[int], tokens: Sequence[int], logprobs: Sequence[float]) -> bytes:
    """The ``TSSR`` v1 bytes of one sequence (see the module docstring)."""
    if len(tokens) != len(logprobs):
        raise ValueError("a recorded sequence needs one logprob per sampled token")
    return b"".join(
        (
            _HEADER.pack(_MAGIC, len(prompt), len(tokens)),
            np.asarray(prompt, dtype="<i4").tobytes(),
            np.asarray(tokens, dtype="<i4").tobytes(),
            np.asarray(logprobs, dtype="<f4").tobytes(),
        )
    )


def decode_record(data: bytes) -> RecordedSequence:
    """Parse ``TSSR`` v1 bytes.

    Raises:
        ValueError: Not a version 1 record, or its lengths are inconsistent.
    """
    if len(data) < _HEADER.size:
        raise ValueError("truncated stability record")
    magic, p, t = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + 4 * p + 8 * t:
        raise ValueError("not a TSSR v1 stability record")
    at = _HEADER.size
    prompt = np.frombuffer(data, dtype="<i4", count=p, offset=at).astype(np.int64)
    tokens = np.frombuffer(data, dtype="<i4", count=t, offset=at + 4 * p).astype(np.int64)
    logprobs = np.frombuffer(data, dtype="<f4", count=t, offset=at + 4 * p + 4 * t).astype(np.float32)
    return RecordedSequence(prompt=prompt, tokens=tokens, logprobs=logprobs)


def seal_records(
    store: EncryptedArtifactStore,
    tenant: str,
    *,
    sampling_session_id: str,
    seq_id: int,
    prompt: Sequence[int],
    sequences: Sequence[tuple[Sequence[int], Sequence[float]]],
) -> list[tuple[str, bytes]]:
    """Seal each ``(tokens, logprobs)`` with the prompt; return ``(sequence_id, blob)`` pairs."""
    ids = sequence_ids(sampling_session_id, seq_id, len(sequences))
    out = []
    for sequence_id, (tokens, logprobs) in zip(ids, sequences, strict=True):
        blob, _ = store.seal_bytes(
            tenant, _artifact_id(sequence_id), encode_record(prompt, tokens, logprobs), kind=_KIND
        )
        out.append((sequence_id, blob))
    return out


def store_records(
    db: Session,
    *,
    tenant: str,
    sampling_session_id: str,
    sealed: Sequence[tuple[str, bytes]],
    now: _dt.datetime | None = None,
) -> None:
    """Insert sealed records in ``db``'s transaction (a re-run of the same request replaces its own).

    A record is replaced only by the request of the same tenant and sampling session that
    produced its id (the ids embed the sampling session), so the new rows always describe
    the result the client received.
    """
    now = now or utcnow()
    ids = [sequence_id for sequence_id, _ in sealed]
    db.execute(
        delete(StabilityRecord).where(
            StabilityRecord.id.in_(ids),
            StabilityRecord.tenant_id == tenant,
            StabilityRecord.sampling_session_id == sampling_session_id,
        )
    )
    expires = now + _dt.timedelta(seconds=STABILITY_TTL_SECONDS)
    for sequence_id, blob in sealed:
        db.add(
            StabilityRecord(
                id=sequence_id,
                tenant_id=tenant,
                sampling_session_id=sampling_session_id,
                created_at=now,
                expires_at=expires,
                blob=blob,
            )
        )


def refresh_records(db: Session, *, tenant: str, ids: Sequence[str], now: _dt.datetime | None = None) -> None:
    """Restart the day of the records ``ids`` (a training request used them)."""
    if not ids:
        return
    now = now or utcnow()
    db.execute(
        update(StabilityRecord)
        .where(StabilityRecord.id.in_(list(ids)), StabilityRecord.tenant_id == tenant)
        .values(expires_at=now + _dt.timedelta(seconds=STABILITY_TTL_SECONDS))
    )


def _load(
    reads: sessionmaker[Session], store: EncryptedArtifactStore, tenant: str, ids: set[str], now: _dt.datetime
) -> dict[str, RecordedSequence]:
    with reads() as db:
        rows = db.execute(
            select(StabilityRecord.id, StabilityRecord.blob).where(
                StabilityRecord.id.in_(sorted(ids)),
                StabilityRecord.tenant_id == tenant,
                StabilityRecord.expires_at > now,
            )
        ).all()
    found = {str(row[0]): bytes(row[1]) for row in rows}
    missing = sorted(ids - set(found))
    if missing:
        raise InvalidRequestError(
            f"unknown or expired sequence_id {missing[0]!r}: provenance spans must name sequences sampled "
            "by this tenant with record_stability_info=True within the last day (each training request "
            "that uses one restarts its day); sample again"
        )
    out = {}
    for sequence_id, blob in found.items():
        out[sequence_id] = decode_record(store.unseal_bytes(tenant, _artifact_id(sequence_id), blob))
    return out


def _source(record: RecordedSequence, span: WireSpan, where: str) -> np.ndarray:
    tokens = record.prompt if span.kind == "prompt" else record.tokens
    if span.offset + span.length > len(tokens):
        raise InvalidRequestError(
            f"{where}: the span [{span.offset}, {span.offset + span.length}) lies outside the {len(tokens)} "
            f"{span.kind} tokens of sequence {span.sequence_id!r}"
        )
    return tokens[span.offset : span.offset + span.length]


def _check_datum(
    index: int, datum: WireDatum, records: Mapping[str, RecordedSequence]
) -> tuple[np.ndarray, np.ndarray]:
    """Check one datum's spans; return its sampled mask and the recorded logprobs (0 elsewhere)."""
    assert datum.model_input_spans is not None and datum.loss_fn_input_spans is not None
    where = f"datum {index}"
    tokens = datum.tokens
    pos = 0
    for j, span in enumerate(datum.model_input_spans):
        expected = _source(records[span.sequence_id], span, f"{where} model_input_spans[{j}]")
        if not np.array_equal(tokens[pos : pos + span.length], expected):
            raise InvalidRequestError(
                f"{where}: model_input_spans[{j}] names {span.kind} tokens of sequence {span.sequence_id!r} "
                "that differ from the recorded ones"
            )
        pos += span.length
    targets = datum.loss_fn_inputs.get("target_tokens")
    if targets is None or targets.ndim != 1:
        raise InvalidRequestError(f"{where}: provenance spans need one-dimensional target_tokens")
    mask = np.zeros(len(targets), dtype=np.float32)
    recorded = np.zeros(len(targets), dtype=np.float32)
    pos = 0
    for j, span in enumerate(datum.loss_fn_input_spans):
        what = f"{where} loss_fn_input_spans[{j}]"
        record = records[span.sequence_id]
        expected = _source(record, span, what)
        if span.kind == "sampled" and span.length:
            if not np.array_equal(targets[pos : pos + span.length], expected):
                raise InvalidRequestError(
                    f"{what}: target_tokens differ from the sampled tokens of sequence "
                    f"{span.sequence_id!r} that the span names"
                )
            # Target at position p = pos + i predicts sampled[offset + i] from
            # prompt + sampled[:offset + i]: the model input must end with that context.
            last = pos + span.length - 1
            context = np.concatenate([record.prompt, record.tokens[: span.offset + span.length - 1]])
            start = last + 1 - len(context)
            if start < 0 or not np.array_equal(tokens[start : last + 1], context):
                raise InvalidRequestError(
                    f"{what}: the model input before these targets is not the recorded context (prompt and "
                    f"earlier sampled tokens) of sequence {span.sequence_id!r}, so its recorded logprobs do "
                    "not apply"
                )
            mask[pos : pos + span.length] = 1.0
            recorded[pos : pos + span.length] = record.logprobs[span.offset : span.offset + span.length]
        pos += span.length
    return mask, recorded


def resolve_provenance(
    reads: sessionmaker[Session],
    store: EncryptedArtifactStore,
    *,
    tenant: str,
    loss_fn: str,
    data: Sequence[WireDatum],
    now: _dt.datetime | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Check every datum's provenance; return each datum's loss inputs and the record ids used.

    For ``stable_reinforce`` the inputs get the recorded ``logprobs`` and ``sampled_mask``
    (every datum must carry spans); for other losses they are the client's, unchanged.

    Raises:
        InvalidRequestError: A server-derived input was sent, a ``stable_reinforce`` datum has no
            spans, a named sequence is unknown, expired or another tenant's, or a span does not
            match its record (see the module docstring).
    """
    now = now or utcnow()
    ids: set[str] = set()
    for i, d in enumerate(data):
        sent = sorted(set(SERVER_DERIVED_INPUTS) & set(d.loss_fn_inputs))
        if sent:
            raise InvalidRequestError(
                f"datum {i}: loss_fn_inputs {', '.join(sent)} is derived by the server from the provenance "
                "spans; do not send it"
            )
        if d.model_input_spans is None or d.loss_fn_input_spans is None:
            if loss_fn == "stable_reinforce":
                raise InvalidRequestError(
                    f"datum {i}: stable_reinforce needs model_input_spans and loss_fn_input_spans naming "
                    "sequences sampled with record_stability_info=True (Datum.with_provenance)"
                )
            continue
        ids.update(s.sequence_id for s in (*d.model_input_spans, *d.loss_fn_input_spans))
    records = _load(reads, store, tenant, ids, now) if ids else {}
    out = []
    for i, d in enumerate(data):
        inputs = dict(d.loss_fn_inputs)
        if d.model_input_spans is not None and d.loss_fn_input_spans is not None:
            mask, recorded = _check_datum(i, d, records)
            if loss_fn == "stable_reinforce":
                inputs["logprobs"] = recorded
                inputs["sampled_mask"] = mask
        out.append(inputs)
    return out, sorted(ids)
