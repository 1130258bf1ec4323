"""Privacy ledgers: the privacy spent on a body of data, kept outside the restorable state.

A training session's own budget lives in its state, and its state can be saved and loaded
again: a client could otherwise save at step 10, train to step 100, load the step-10 state
into a new run and train another 90 steps on the same data with a certificate that counts
only the last 90. The ledger closes that hole. Rules:

* ``create_model`` with a DP policy creates a ledger (:func:`new_ledger`); the run's
  ``training_models.ledger_id`` names it.
* A run created from a checkpoint (``load_weights``) spends from the ledger of the run that
  saved it (:func:`lineage_ledger`): every branch of a lineage adds to one total.
* A data set registered for server-side sampling is identified by a keyed digest
  (:meth:`~tensafe.storage.EncryptedArtifactStore.tenant_digest`); registering the same data
  set in a fresh run continues its ledger (:func:`attach_dataset`).
* Every DP-SGD step is charged *before* it runs (:func:`reserve_step`), in one transaction
  that locks the ledger, re-reads its spend, lets the caller check the budget against it and
  records the step. A step that is retried after a crash reuses its charge (``(model_id,
  step_index)`` is unique); a charge is never removed, so a crash can only over-count.
* A server-sampled step's Poisson batch is sealed into its charge (``draw_blob``) before the
  step trains on it, and cleared when the step completes (:func:`clear_draw`): a reload
  restores the batch (:func:`pending_draw`) instead of drawing a new one.
* Every charge is also an audit record (``privacy.step_charged``, resource the ledger id,
  details the run, the step and σ and q as decimal strings) appended in the same transaction.
  The ledger table is what the server reads; the hash-chained, signed audit log is what a
  database writer cannot quietly rewrite. :func:`audit_mismatch` compares the two before a
  certificate is issued, so deleting charges or editing their σ is refused, not certified.

The session is told the ledger's spend (:meth:`LoraTrainingSession.sync_privacy`) before
each step, so ε, the budget check, the ``dp_epsilon:max`` metric and the certificate all
cover the whole ledger.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tensafe.db import utcnow
from tensafe.server.models import PrivacyLedger, PrivacySpend, TrainingModel

__all__ = [
    "CHARGE_ACTION",
    "attach_dataset",
    "audit_mismatch",
    "clear_draw",
    "ledger_events",
    "lineage_ledger",
    "new_ledger",
    "pending_draw",
    "reserve_step",
]


#: Audit action of a ledger charge.
CHARGE_ACTION = "privacy.step_charged"


def new_ledger(session: Session, tenant: str) -> str:
    """Create an empty ledger for ``tenant`` inside the caller's transaction; return its id."""
    ledger = PrivacyLedger(id="ldg-" + secrets.token_hex(12), tenant_id=tenant, created_at=utcnow())
    session.add(ledger)
    session.flush()
    return ledger.id


def lineage_ledger(session: Session, source: TrainingModel) -> str:
    """The ledger a run created from ``source``'s checkpoint spends from.

    A source without one (created before ledgers existed) gets one now, so that every later
    branch of it shares it.
    """
    if source.ledger_id is None:
        source.ledger_id = new_ledger(session, source.tenant_id)
    return source.ledger_id


def ledger_events(session: Session, ledger_id: str, *, exclude: tuple[str, int] | None = None) -> list[Any]:
    """The ledger's spend as :class:`~tensafe.privacy.DpSgdEvent` records (one per mechanism).

    Args:
        session: An open session.
        ledger_id: The ledger.
        exclude: ``(model_id, step_index)`` of a charge to leave out (the step being retried).
    """
    from tensafe.privacy import DpSgdEvent

    query = (
        select(
            PrivacySpend.model_id,
            PrivacySpend.step_index,
            PrivacySpend.noise_multiplier,
            PrivacySpend.sample_rate,
        )
        .where(PrivacySpend.ledger_id == ledger_id)
        .order_by(PrivacySpend.id)
    )
    counts: dict[tuple[float, float], int] = {}
    for model_id, step_index, sigma, q in session.execute(query):
        if exclude is not None and (model_id, step_index) == exclude:
            continue
        counts[(float(sigma), float(q))] = counts.get((float(sigma), float(q)), 0) + 1
    return [DpSgdEvent(noise_multiplier=s, sample_rate=q, steps=n) for (s, q), n in counts.items()]


def _lock(session: Session, ledger_id: str) -> PrivacyLedger:
    """Lock the ledger row (PostgreSQL ``FOR UPDATE``; SQLite already holds the write lock)."""
    row = session.execute(
        select(PrivacyLedger).where(PrivacyLedger.id == ledger_id).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise LookupError(f"privacy ledger {ledger_id!r} does not exist")
    return row


def reserve_step(
    session: Session,
    *,
    tenant: str,
    ledger_id: str,
    model_id: str,
    step_index: int,
    noise_multiplier: float,
    sample_rate: float,
    check: Callable[[Sequence[Any]], None],
    audit: Callable[[Session, dict[str, Any]], None],
    draw_blob: bytes | None = None,
) -> list[Any]:
    """Charge one step to the ledger, after ``check`` accepted the spend so far.

    Runs inside the caller's write transaction: the ledger row is locked, so two runs of one
    lineage cannot both pass the check on the same total. ``check(events)`` receives the
    ledger's spend *without* this step and raises (budget exhausted, step limit) to refuse
    it; nothing is recorded then. A charge that already exists for ``(model_id,
    step_index)`` (the step is being retried after a crash) is reused. A new charge is
    passed to ``audit(session, details)``, which appends its audit record
    (:data:`CHARGE_ACTION`) in the same transaction.

    Returns:
        The ledger's events without this step (what the session must be synchronised to
        before it takes the step).
    """
    _lock(session, ledger_id)
    before = ledger_events(session, ledger_id, exclude=(model_id, step_index))
    check(before)
    existing = session.execute(
        select(PrivacySpend).where(PrivacySpend.model_id == model_id, PrivacySpend.step_index == step_index)
    ).scalar_one_or_none()
    if existing is None:
        session.add(
            PrivacySpend(
                ledger_id=ledger_id,
                tenant_id=tenant,
                model_id=model_id,
                step_index=step_index,
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                created_at=utcnow(),
                draw_blob=draw_blob,
            )
        )
        session.flush()
        audit(
            session,
            {
                "model_id": model_id,
                "step_index": int(step_index),
                "noise_multiplier": repr(float(noise_multiplier)),
                "sample_rate": repr(float(sample_rate)),
            },
        )
    return before


def pending_draw(session: Session, model_id: str, step_index: int) -> bytes | None:
    """The sealed Poisson batch of a charged step that has not completed, if any."""
    row = session.execute(
        select(PrivacySpend.draw_blob).where(
            PrivacySpend.model_id == model_id, PrivacySpend.step_index == step_index
        )
    ).first()
    return None if row is None else row[0]


def clear_draw(session: Session, model_id: str, step_index: int) -> None:
    """Forget the sealed batch of a completed step (its charge stays)."""
    session.execute(
        update(PrivacySpend)
        .where(PrivacySpend.model_id == model_id, PrivacySpend.step_index == step_index)
        .values(draw_blob=None)
    )


def attach_dataset(session: Session, *, model_id: str, dataset_key: str) -> str:
    """Identify the run's ledger by the data set it registered; return the ledger it now uses.

    If the tenant already has a ledger for this data set (another run registered the same
    examples), the run switches to it, so the spend continues from that ledger's total;
    otherwise the run's own ledger records the key. Called in the transaction that
    completes ``register_dataset`` (the run has taken no step yet).
    """
    model = session.get(TrainingModel, model_id)
    if model is None or model.ledger_id is None:
        raise LookupError(f"training model {model_id!r} has no privacy ledger")
    found = session.execute(
        select(PrivacyLedger.id).where(
            PrivacyLedger.tenant_id == model.tenant_id, PrivacyLedger.dataset_key == dataset_key
        )
    ).scalar_one_or_none()
    if found is not None and found != model.ledger_id:
        model.ledger_id = found
        return found
    if found is None:
        own = _lock(session, model.ledger_id)
        try:
            with session.begin_nested():
                own.dataset_key = dataset_key
                session.flush()
        except IntegrityError:  # registered concurrently by another run: join that ledger
            winner = session.execute(
                select(PrivacyLedger.id).where(
                    PrivacyLedger.tenant_id == model.tenant_id, PrivacyLedger.dataset_key == dataset_key
                )
            ).scalar_one()
            model.ledger_id = winner
            return winner
    return model.ledger_id


def audit_mismatch(session: Session, *, tenant: str, ledger_id: str) -> str | None:
    """Compare a ledger's charges with their audit records; return what differs, or None.

    Every charge is recorded in the tenant's hash-chained audit log when it is made; the
    charges of the table must be exactly those records (same run, step, σ and q). A charge
    deleted or edited with raw SQL shows up here (and rewriting the audit records to match
    breaks the audit chain's signed checkpoints).
    """
    from tensafe.audit.models import AuditRecordRow

    table = sorted(
        (m, int(i), repr(float(sg)), repr(float(q)))
        for m, i, sg, q in session.execute(
            select(
                PrivacySpend.model_id,
                PrivacySpend.step_index,
                PrivacySpend.noise_multiplier,
                PrivacySpend.sample_rate,
            ).where(PrivacySpend.ledger_id == ledger_id)
        )
    )
    audited = []
    for (details,) in session.execute(
        select(AuditRecordRow.details).where(
            AuditRecordRow.tenant_id == tenant,
            AuditRecordRow.action == CHARGE_ACTION,
            AuditRecordRow.resource == ledger_id,
        )
    ):
        try:
            d = json.loads(details)
            audited.append(
                (str(d["model_id"]), int(d["step_index"]), str(d["noise_multiplier"]), str(d["sample_rate"]))
            )
        except (ValueError, KeyError, TypeError):
            return "an audit record of a charge is malformed"
    audited.sort()
    if table == audited:
        return None
    missing = len(set(audited) - set(table))
    extra = len(set(table) - set(audited))
    return (
        f"the privacy ledger {ledger_id} does not match the audit log: {missing} audited charge(s) are "
        f"missing or altered in the ledger, {extra} charge(s) have no audit record"
    )
