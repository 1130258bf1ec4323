"""Checkpoint lifecycle, the job side: rows, artifacts, the external-weights export, publishing rules.

Nothing here is an HTTP route (the routes are :mod:`tensafe.server.routers.checkpoints`)
and nothing imports FastAPI: the worker's jobs (:mod:`tensafe.server.ops`) and the sweeps
(:mod:`tensafe.server.retention`) use this module without the web layer.

* :func:`export_external_weights` executes ``save_weights_external``: the model's current
  LoRA adapter in PEFT format (``adapter_model.safetensors``, ``adapter_config.json``) plus,
  for a run trained with DP, its signed ``dp_certificate.json``, stored encrypted under the
  tenant's DEK as the checkpoint ``tinker://<model>/external_weights/<name>``, with an
  encrypted manifest (:data:`MANIFEST_FORMAT`). With ``age_encryption_recipients`` every
  file is additionally age-encrypted (``pyrage``) to those recipients and named
  ``<file>.age``.
* :func:`publish_refusal`: TenSafe's privacy rule for publishing. Only the adapter of a run
  trained under a DP policy may be published.
* :func:`record_checkpoint`, :func:`find_checkpoint`, :func:`checkpoint_is_live`,
  :func:`is_expired` and :func:`delete_checkpoint_artifacts`: the rows and files of a
  checkpoint. A checkpoint whose ``expires_at`` has passed is invisible at once; the sweep
  (:func:`tensafe.server.retention.sweep_expired_checkpoints`) deletes it later.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.protocol import CHECKPOINT_KINDS, CheckpointKind, InvalidTinkerPathError, TinkerPath
from tensafe.protocol.tensafe import MAX_TTL_SECONDS, MIN_TTL_SECONDS
from tensafe.server.errors import BadRequestError, JobFailedError
from tensafe.server.jobs import JobContext, JobResult
from tensafe.server.models import TrainingCheckpoint, TrainingModel
from tensafe.storage import EncryptedArtifactStore

__all__ = [
    "CHECKPOINT_KINDS",
    "DOWNLOAD_URL_SECONDS",
    "EXTERNAL_KIND",
    "MANIFEST_FORMAT",
    "MAX_AGE_RECIPIENTS",
    "MAX_TTL_SECONDS",
    "MIN_TTL_SECONDS",
    "checkpoint_is_live",
    "checkpoint_path",
    "checkpoint_view",
    "delete_checkpoint_artifacts",
    "export_external_weights",
    "find_checkpoint",
    "is_expired",
    "parse_checkpoint_path",
    "publish_refusal",
    "record_checkpoint",
    "str_metadata",
]

#: Lifetime of a download URL (seconds).
DOWNLOAD_URL_SECONDS = 15 * 60
#: Most age recipients one export may name (the SDK documents at most 10).
MAX_AGE_RECIPIENTS = 10

#: Format label of the encrypted manifest ``<ref>.manifest`` of an external-weights export.
MANIFEST_FORMAT = "tensafe.external_weights/v1"
#: The kind of an exported adapter.
EXTERNAL_KIND: CheckpointKind = "external_weights"


# --------------------------------------------------------------------------- paths and views


def parse_checkpoint_path(path: str) -> TinkerPath:
    """Parse a client's ``tinker://`` path.

    Raises:
        BadRequestError: ``path`` is not a checkpoint path (the message shows the form).
    """
    try:
        return TinkerPath.parse(path)
    except InvalidTinkerPathError as exc:
        raise BadRequestError(str(exc)) from None


def checkpoint_path(row: TrainingCheckpoint) -> TinkerPath:
    """The ``tinker://`` path of a stored checkpoint."""
    return TinkerPath(run_id=row.model_id, kind=cast("CheckpointKind", row.kind), name=row.name)


def str_metadata(raw: str) -> dict[str, str] | None:
    """A checkpoint's stored ``user_metadata`` JSON as Tinker's ``dict[str, str]`` (None if absent)."""
    data = json.loads(raw) if raw else None
    if not isinstance(data, dict):
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def checkpoint_view(row: TrainingCheckpoint) -> p.Checkpoint:
    """A stored checkpoint as the REST API lists it."""
    path = checkpoint_path(row)
    return p.Checkpoint(
        checkpoint_id=path.checkpoint_id,
        checkpoint_type=path.checkpoint_type,
        time=row.created_at,
        tinker_path=str(path),
        size_bytes=row.size_bytes,
        public=row.public,
        user_metadata=str_metadata(row.user_metadata),
        expires_at=row.expires_at,
    )


# --------------------------------------------------------------------------- helpers


def checkpoint_is_live(now: _dt.datetime | None = None) -> ColumnElement[bool]:
    """SQL condition: the checkpoint has no expiry or has not expired at ``now``."""
    moment = now or utcnow()
    return or_(TrainingCheckpoint.expires_at.is_(None), TrainingCheckpoint.expires_at > moment)


def is_expired(row: TrainingCheckpoint, now: _dt.datetime | None = None) -> bool:
    """Whether the checkpoint's TTL has passed (it is then invisible even before the sweeper runs)."""
    return row.expires_at is not None and row.expires_at <= (now or utcnow())


def delete_checkpoint_artifacts(store: EncryptedArtifactStore, tenant: str, ref: str | None) -> int:
    """Delete every encrypted artifact of a checkpoint: ``ref`` and ``ref.<anything>``.

    This covers each layout (``weights``: ``ref``; ``sampler_weights``: ``ref.0``, ``ref.1``;
    ``external_weights``: ``ref.<i>`` and ``ref.manifest``). Returns how many were deleted.
    """
    if not ref:
        return 0
    names = [a for a in store.list(tenant) if a == ref or a.startswith(ref + ".")]
    return sum(1 for name in names if store.delete(tenant, name))


def find_checkpoint(session: Session, model_id: str, kind: str, name: str) -> TrainingCheckpoint | None:
    """The row of ``tinker://{model_id}/{kind}/{name}``, live or expired, if any."""
    return session.execute(
        select(TrainingCheckpoint).where(
            TrainingCheckpoint.model_id == model_id,
            TrainingCheckpoint.kind == kind,
            TrainingCheckpoint.name == name,
        )
    ).scalar_one_or_none()


def record_checkpoint(
    session: Session,
    *,
    tenant: str,
    model_id: str,
    kind: str,
    name: str,
    artifact_id: str,
    size_bytes: int,
    user_metadata: str,
    ttl_seconds: int | None,
) -> TrainingCheckpoint:
    """Create the row of a new checkpoint, or replace an existing (expired or overwritten) one.

    A replaced row keeps only its id: the new content is not published and gets its own
    creation time and expiry.
    """
    now = utcnow()
    row = find_checkpoint(session, model_id, kind, name)
    if row is None:
        row = TrainingCheckpoint(
            id="ckpt-" + secrets.token_hex(10), tenant_id=tenant, model_id=model_id, kind=kind, name=name
        )
        session.add(row)
    row.public = False
    row.artifact_id, row.size_bytes, row.user_metadata, row.created_at = (
        artifact_id,
        size_bytes,
        user_metadata,
        now,
    )
    row.expires_at = None if ttl_seconds is None else now + _dt.timedelta(seconds=int(ttl_seconds))
    return row


def publish_refusal(model: TrainingModel | None, kind: str) -> str | None:
    """Why TenSafe's privacy rule forbids publishing a checkpoint of ``kind`` of ``model``, or None.

    Only the adapter of a run with a differential privacy guarantee may be published: a
    ``weights`` checkpoint (training state) holds the optimizer state and, for a
    server-sampled run, the registered data set itself; a run without DP, or whose noise was
    deterministic (``TS_DETERMINISTIC=1``), has no guarantee.
    """
    if kind == "weights":
        return (
            "training-state (weights) checkpoints hold the optimizer state and, for server-sampled runs, "
            "the registered data set; publish the adapter instead (save_weights_for_sampler or "
            "save_weights_external)"
        )
    if model is None or not model.dp_policy:
        return "this run has no DP policy"
    try:
        data = json.loads(model.dp_policy)
    except ValueError:
        return "this run has no readable DP policy"
    if not (isinstance(data, dict) and isinstance(data.get("policy"), dict)):
        return "this run has no DP policy"
    from tensafe.server.privacy import model_certificate

    try:
        certificate = model_certificate(model)
    except Exception:  # an unreadable record never admits a publication
        return "the run's DP certificate cannot be read"
    if certificate is not None and not certificate.private:
        return "the run's noise was deterministic (TS_DETERMINISTIC=1), so it has no privacy guarantee"
    return None


# --------------------------------------------------------------------------- the export job


def _age_recipients(raw: Sequence[Any]) -> list[Any]:
    """Parse age recipients (``age1...`` X25519 keys or SSH public keys) with ``pyrage``."""
    import pyrage

    if len(raw) > MAX_AGE_RECIPIENTS:
        raise JobFailedError(
            f"at most {MAX_AGE_RECIPIENTS} age recipients are accepted, got {len(raw)}", category="user"
        )
    recipients: list[Any] = []
    for i, text in enumerate(raw, start=1):
        value = str(text).strip()
        try:
            if value.startswith("age1"):
                recipients.append(pyrage.x25519.Recipient.from_str(value))
            elif value.startswith(("ssh-ed25519 ", "ssh-rsa ")):
                recipients.append(pyrage.ssh.Recipient.from_str(value))
            else:
                raise JobFailedError(
                    f"age recipient #{i} is neither an X25519 key (age1...) nor an ssh-ed25519/ssh-rsa "
                    "public key",
                    category="user",
                )
        except pyrage.RecipientError as exc:
            raise JobFailedError(f"age recipient #{i} is invalid: {exc}", category="user") from None
    return recipients


def _export_files(ctx: JobContext, session: Any, ledger_id: str | None) -> dict[str, bytes]:
    """The PEFT adapter files and, for a run with a DP policy, its signed DP certificate."""
    from tensafe.privacy.certificate import CERTIFICATE_FILENAME
    from tensafe.training.runtime import SessionStateError

    files: dict[str, bytes] = dict(session.sampler_weights_files())
    if getattr(session, "policy", None) is not None:
        try:
            certificate = session.privacy_certificate()
        except SessionStateError:
            return files  # server_poisson before its data set is registered: nothing trained yet
        signer = ctx.services.signer
        if signer is None:
            raise JobFailedError(
                "this server has no deployment signing key, so it cannot issue a signed DP certificate",
                category="server",
            )
        if ledger_id is not None:
            certificate = dataclasses.replace(certificate, ledger_id=ledger_id)
        files[CERTIFICATE_FILENAME] = certificate.sign(signer).to_json().encode("utf-8")
    return files


def export_external_weights(ctx: JobContext, session: Any, *, ledger_id: str | None = None) -> JobResult:
    """Execute ``save_weights_external`` for the loaded training ``session`` of ``ctx.model_id``.

    The DP certificate is signed by the deployment's key and names the run's privacy ledger
    (``ledger_id``), whose whole spend its ε covers (the caller synchronises the session).

    Raises:
        JobFailedError: A bad name, an existing live checkpoint of that name or invalid age
            recipients (category ``user``).
    """
    import pyrage

    model_id, tenant, store = str(ctx.model_id), ctx.tenant, ctx.services.store
    name = str(ctx.payload.get("path") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise JobFailedError(f"invalid external weights name {name!r}", category="user")
    path = str(TinkerPath(run_id=model_id, kind=EXTERNAL_KIND, name=name))
    raw_recipients = ctx.payload.get("age_encryption_recipients") or []
    recipients = _age_recipients(raw_recipients) if raw_recipients else []
    with ctx.services.sessions() as db:
        existing = find_checkpoint(db, model_id, EXTERNAL_KIND, name)
        if existing is not None and not is_expired(existing):
            raise JobFailedError(
                f"checkpoint {path} already exists; choose another name",
                category="user",
            )
        old_ref = None if existing is None else existing.artifact_id

    files = _export_files(ctx, session, ledger_id)
    ref = "ext-" + secrets.token_hex(12)
    entries: list[dict[str, Any]] = []
    size = 0
    for i, (file_name, plain) in enumerate(sorted(files.items())):
        data, served = plain, file_name
        if recipients:
            data, served = pyrage.encrypt(plain, recipients), file_name + ".age"
        artifact = f"{ref}.{i}"
        store.put_bytes(tenant, artifact, data, kind="external-weights")
        entries.append(
            {
                "name": served,
                "artifact": artifact,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        size += len(data)
    manifest = {"format": MANIFEST_FORMAT, "age_encrypted": bool(recipients), "files": entries}
    store.put_bytes(tenant, f"{ref}.manifest", json.dumps(manifest, sort_keys=True).encode(), kind="manifest")
    ttl = ctx.payload.get("ttl_seconds")

    def apply(db: Session) -> None:
        record_checkpoint(
            db,
            tenant=tenant,
            model_id=model_id,
            kind=EXTERNAL_KIND,
            name=name,
            artifact_id=ref,
            size_bytes=size,
            user_metadata="{}",
            ttl_seconds=None if ttl is None else int(ttl),
        )

    def cleanup() -> None:
        if old_ref is not None and old_ref != ref:
            delete_checkpoint_artifacts(store, tenant, old_ref)

    return JobResult(
        json={"path": path, "size_bytes": size, "type": "save_weights_external"},
        apply=apply,
        after_commit=cleanup,
        details={
            "checkpoint": path,
            "artifact": ref,
            "size_bytes": size,
            "files": [e["name"] for e in entries],
            "age_recipients": len(recipients),
        },
    )
