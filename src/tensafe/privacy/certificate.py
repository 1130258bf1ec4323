"""The DP certificate: a versioned, signed JSON statement of a run's privacy guarantee.

A certificate (``dp_certificate.json``, schema ``tensafe.dp_certificate/v2``) records what
was proven about one training run, machine-readably: whether a guarantee holds at all
(``private``), the (ε, δ) pair, the accountant and every spending record it composed
(``events``), who drew the batches (``sampled_by``) and whether sampling amplification was
used (``amplification``), where the data set size came from (``dataset_size_source``), the
random number generator of the noise (``noise_rng``) and the privacy unit. ``statement`` is a
sentence derived from those fields by a fixed v2 rule (``docs/privacy.md``).

Every certificate is checked on construction, so an object of this class is always
internally consistent. In particular:

* ``amplification = "poisson_subsampling"`` only when the engine itself drew Poisson batches
  (``sampling_method = "poisson"``, ``sampled_by = "engine"``), and then
  ``sample_rate == expected_batch_size / dataset_size``. A client that chooses its batches
  gets no amplification: ``sample_rate`` is 1 and every example counts as present at every
  step. TenSafe never certifies a Poisson ε it did not perform.
* ``private`` is true exactly when DP-SGD ran with noise from the operating system's CSPRNG.
  Deterministic (seeded, non-cryptographic) noise gives ``private = false`` and no ε.
* ``epsilon`` is what the accountant computes from ``events`` at ``delta``;
  :meth:`DpCertificate.recompute_epsilon` recomputes it.

A certificate is signed (``signature``) by the deployment's hybrid signing key
(Ed25519 + ML-DSA-65) over its canonical JSON (RFC 8785) without the ``signature`` member,
with the domain-separation context :data:`SIGNATURE_CONTEXT`. The privacy layer does not
hold keys: :meth:`DpCertificate.sign` and :meth:`DpCertificate.verify_signature` take any
object with the methods of :class:`tensafe.crypto.signing.HybridSigningKey` /
``HybridVerifyingKey``. Verification raises; it never returns a bool.

Version 1 certificates (``tensafe.dp_certificate/v1``) could state a conditional ε for
batches a client chose; this version refuses to read them (see ``docs/privacy.md``). TSSP
packages that carry one still verify as packages.

The JSON Schema is shipped as ``dp_certificate.schema.json`` next to this module.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import functools
import importlib.metadata
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, Self

from tensafe._canonical import CanonicalJSONError, canonical_json
from tensafe._version import __version__
from tensafe.privacy._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    validate_delta,
)
from tensafe.privacy.accountants.registry import create_accountant, get_accountant_class
from tensafe.privacy.errors import CertificateError, PrivacyError
from tensafe.privacy.events import DpSgdEvent, SamplingMethod

__all__ = [
    "AMPLIFICATION",
    "CERTIFICATE_FILENAME",
    "CERTIFICATE_SCHEMA",
    "DATASET_SIZE_SOURCES",
    "NOISE_RNGS",
    "PRIVACY_UNITS",
    "SIGNATURE_CONTEXT",
    "CertificateSigner",
    "CertificateVerifier",
    "DpCertificate",
    "schema_path",
]

#: Schema identifier written in every certificate of this version.
CERTIFICATE_SCHEMA = "tensafe.dp_certificate/v2"
#: The conventional file name.
CERTIFICATE_FILENAME = "dp_certificate.json"
#: Domain-separation context of the certificate signature.
SIGNATURE_CONTEXT = "tensafe/dp-certificate/v2"
#: Where ``dataset_size`` came from: the trainer counted the records it loaded (``counted``), the
#: server counted the data set the client registered (``registered``), the client or the
#: tenant's policy declared it (``declared``), or the operator's default applied (``defaulted``).
DATASET_SIZE_SOURCES = ("counted", "registered", "declared", "defaulted")
#: The noise generator: the OS CSPRNG, or the seeded, NON-private generator of TS_DETERMINISTIC=1.
NOISE_RNGS = ("csprng", "deterministic")
#: ``example``: one record of the training file (``tensafe train``); ``datum``: one distinct
#: ``Datum`` of the training API (duplicates within a step are refused; see docs/privacy.md).
PRIVACY_UNITS = ("example", "datum")
#: ``poisson_subsampling``: ε uses the amplification of Poisson sampling the engine performed;
#: ``none``: every example counts as present in every step (sample_rate = 1).
AMPLIFICATION = ("poisson_subsampling", "none")
SIGNATURE_ALGORITHM = "ed25519+ml-dsa-65"

#: Distributions whose versions are recorded (the ones absent are recorded as null).
_TRACKED_DISTRIBUTIONS = ("torch", "dp-accounting", "prv-accountant", "opacus", "peft", "transformers")
_MAX_FILE_BYTES = 1 << 20
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
_LEDGER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16,128}$")
_V1_SCHEMA = "tensafe.dp_certificate/v1"


class CertificateSigner(Protocol):
    """What signs a certificate (satisfied by ``tensafe.crypto.signing.HybridSigningKey``)."""

    def sign(self, message: bytes, *, context: str) -> bytes:
        """Return a signature of ``message`` bound to ``context``."""
        ...

    def verifying_key(self) -> CertificateVerifier:
        """Return the matching public key."""
        ...


class CertificateVerifier(Protocol):
    """What checks a certificate signature (``tensafe.crypto.signing.HybridVerifyingKey``)."""

    @property
    def key_id(self) -> str:
        """Stable identifier of the key (hex fingerprint)."""
        ...

    def verify(self, signature: bytes, message: bytes, *, context: str) -> None:
        """Raise if ``signature`` is not valid for ``message`` under ``context``."""
        ...


def schema_path() -> Path:
    """Return the path of the shipped JSON Schema (``dp_certificate.schema.json``)."""
    return Path(__file__).with_name("dp_certificate.schema.json")


def _library_versions() -> dict[str, str | None]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str | None], ...]:
    """The versions of the libraries a certificate names, read once per process.

    Reading package metadata costs milliseconds; the training API issues a certificate
    after every step. Installed versions do not change under a running process.
    """
    versions: dict[str, str | None] = {"tensafe": __version__}
    for dist in _TRACKED_DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return tuple(versions.items())


def _now_rfc3339() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _title(accountant: str) -> str:
    return get_accountant_class(accountant).title


def _statement(cert: DpCertificate) -> str:
    """Return the v2 statement sentence for ``cert`` (wording frozen for schema v2)."""
    unit = cert.privacy_unit
    if not cert.dp_enabled:
        return (
            "No differential privacy guarantee: this run trained without DP-SGD, so ε is infinite "
            f"for each training {unit}."
        )
    if not cert.private:
        return (
            "No differential privacy guarantee: DP-SGD ran with deterministic, non-cryptographic noise "
            "(TS_DETERMINISTIC=1) that anyone who knows the seed can remove, so ε is infinite for each "
            f"training {unit}."
        )
    assert cert.epsilon is not None and cert.delta is not None and cert.accountant is not None
    head = f"(ε={cert.epsilon:.3g}, δ={cert.delta:g})-DP for each training {unit}"
    acct = _title(cert.accountant)
    if cert.amplification == "poisson_subsampling":
        return (
            f"{head} under Poisson sampling at rate q={cert.sample_rate:g} performed by the engine, "
            f"over {cert.steps} steps ({acct})."
        )
    who = (
        "the client chose the batches"
        if cert.sampled_by == "client"
        else "the batches were not Poisson-sampled"
    )
    return (
        f"{head} without sampling amplification: {who}, so each {unit} counts as present in every one "
        f"of the {cert.steps} steps ({acct})."
    )


def _events_from_json(raw: object) -> tuple[DpSgdEvent, ...]:
    if not isinstance(raw, list):
        raise CertificateError("invalid DP certificate: events must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"noise_multiplier", "sample_rate", "steps"}:
            raise CertificateError(
                "invalid DP certificate: each event needs exactly noise_multiplier, sample_rate and steps"
            )
        try:
            out.append(
                DpSgdEvent(
                    noise_multiplier=item["noise_multiplier"],
                    sample_rate=item["sample_rate"],
                    steps=item["steps"],
                )
            )
        except PrivacyError as exc:
            raise CertificateError(f"invalid DP certificate: bad event ({exc})") from None
    return tuple(out)


def _event_json(event: DpSgdEvent) -> dict[str, Any]:
    return {
        "noise_multiplier": event.noise_multiplier,
        "sample_rate": event.sample_rate,
        "steps": event.steps,
    }


def _merge(events: Iterable[DpSgdEvent]) -> tuple[DpSgdEvent, ...]:
    """Drop empty records and merge consecutive records of the same mechanism."""
    out: list[DpSgdEvent] = []
    for e in events:
        if e.steps == 0:
            continue
        if out and out[-1].same_mechanism(e):
            out[-1] = dataclasses.replace(out[-1], steps=out[-1].steps + e.steps)
        else:
            out.append(
                DpSgdEvent(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
            )
    return tuple(out)


def _epsilon_of(accountant: str, events: Sequence[DpSgdEvent], delta: float) -> float:
    acc = create_accountant(accountant)
    for e in events:
        acc.compose(e)
    return acc.get_epsilon(delta)


@dataclass(frozen=True)
class DpCertificate:
    """Privacy guarantee of one training run (schema ``tensafe.dp_certificate/v2``).

    Build one with :meth:`issue` (DP-SGD ran; ε is computed here, never passed in) or
    :meth:`non_private` (no DP-SGD), sign it with :meth:`sign`, then :meth:`write` it.
    Every field is validated on construction; ``statement``, ``private`` and
    ``amplification`` are derived and checked.

    Attributes:
        private: Whether a finite (ε, δ) guarantee holds (DP-SGD with CSPRNG noise).
        dp_enabled: Whether DP-SGD (per-unit clipping and Gaussian noise) ran at all.
        epsilon: ε (``None`` unless ``private``).
        delta: δ (``None`` when DP-SGD did not run).
        accountant: Accountant name (``None`` when DP-SGD did not run).
        noise_multiplier: σ of the run's steps (``None`` when DP-SGD did not run).
        clip_norm: Per-unit gradient clip norm C (``None`` when DP-SGD did not run).
        sample_rate: q the accountant used for this run's steps: ``expected_batch_size /
            dataset_size`` with engine Poisson sampling, 1 without amplification.
        steps: DP-SGD steps the guarantee covers (all records of ``events``).
        events: The spending records ε composes: ``{"noise_multiplier", "sample_rate",
            "steps"}`` each; with a privacy ledger they include the steps of every run that
            trained on the same data (see ``ledger_id``).
        dataset_size: N, the number of privacy units.
        dataset_size_source: One of :data:`DATASET_SIZE_SOURCES`.
        expected_batch_size: B, the normaliser of the noisy gradient sum (and, with engine
            Poisson sampling, ``q * N``).
        sampling_method: A :class:`~tensafe.privacy.events.SamplingMethod` value.
        sampled_by: ``engine`` or ``client``: who chose the examples of each batch.
        amplification: One of :data:`AMPLIFICATION` (derived).
        noise_rng: One of :data:`NOISE_RNGS` (``None`` when DP-SGD did not run).
        privacy_unit: One of :data:`PRIVACY_UNITS`.
        ledger_id: The privacy ledger whose total spend ε covers (training API), or None.
        created: RFC 3339 UTC timestamp (``YYYY-MM-DDTHH:MM:SSZ``).
        library_versions: Versions of tensafe and of the libraries the guarantee depends on.
        notes: Free-text remarks, in order.
        signature: ``{"alg", "key_id", "value"}`` (base64) or ``None`` (unsigned).
        statement: The human sentence derived from the fields.
    """

    dp_enabled: bool
    epsilon: float | None
    delta: float | None
    accountant: str | None
    noise_multiplier: float | None
    clip_norm: float | None
    sample_rate: float | None
    steps: int
    dataset_size: int
    dataset_size_source: str
    expected_batch_size: int | None
    sampling_method: str
    sampled_by: str
    noise_rng: str | None
    events: tuple[Mapping[str, Any], ...] = ()
    privacy_unit: str = "example"
    ledger_id: str | None = None
    created: str = field(default_factory=_now_rfc3339)
    library_versions: Mapping[str, str | None] = field(default_factory=_library_versions)
    notes: tuple[str, ...] = ()
    signature: Mapping[str, str] | None = None
    schema: str = CERTIFICATE_SCHEMA
    private: bool = field(init=False, default=False)
    amplification: str = field(init=False, default="none")
    statement: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if isinstance(self.events, str | bytes) or not all(isinstance(e, Mapping) for e in self.events):
            raise CertificateError("invalid DP certificate: events must be a list of objects")
        if isinstance(self.notes, str | bytes):
            raise CertificateError("invalid DP certificate: notes must be a list of strings")
        if not isinstance(self.library_versions, Mapping):
            raise CertificateError("invalid DP certificate: library_versions must be an object")
        if self.signature is not None and not isinstance(self.signature, Mapping):
            raise CertificateError("invalid DP certificate: signature must be an object or null")
        object.__setattr__(self, "events", tuple(dict(e) for e in self.events))
        object.__setattr__(self, "library_versions", dict(self.library_versions))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.signature is not None:
            object.__setattr__(self, "signature", dict(self.signature))
        try:
            self._validate()
        except PrivacyError as exc:
            if isinstance(exc, CertificateError):
                raise
            raise CertificateError(f"invalid DP certificate: {exc}") from None
        object.__setattr__(self, "statement", _statement(self))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def bad(msg: str) -> CertificateError:
            return CertificateError(f"invalid DP certificate: {msg}")

        if self.schema != CERTIFICATE_SCHEMA:
            raise bad(f"unsupported schema {self.schema!r}; this TenSafe reads {CERTIFICATE_SCHEMA!r}")
        if not isinstance(self.dp_enabled, bool):
            raise bad("dp_enabled must be true or false")
        check_steps(self.steps)
        if (
            isinstance(self.dataset_size, bool)
            or not isinstance(self.dataset_size, int)
            or self.dataset_size < 1
        ):
            raise bad(f"dataset_size must be a positive integer, got {self.dataset_size!r}")
        if self.dataset_size_source not in DATASET_SIZE_SOURCES:
            raise bad(f"dataset_size_source must be one of {list(DATASET_SIZE_SOURCES)}")
        b = self.expected_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise bad(f"expected_batch_size must be a positive integer or null, got {b!r}")
        try:
            method = SamplingMethod(self.sampling_method)
        except ValueError:
            raise bad(
                f"unknown sampling_method {self.sampling_method!r}; "
                f"expected one of {[m.value for m in SamplingMethod]}"
            ) from None
        if self.sampled_by not in ("engine", "client"):
            raise bad("sampled_by must be 'engine' or 'client'")
        if (method is SamplingMethod.CLIENT_CHOSEN_BATCHES) != (self.sampled_by == "client"):
            raise bad("sampled_by is 'client' exactly when sampling_method is 'client_chosen_batches'")
        amplified = method is SamplingMethod.POISSON and self.sampled_by == "engine"
        object.__setattr__(self, "amplification", "poisson_subsampling" if amplified else "none")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise bad(f"privacy_unit must be one of {list(PRIVACY_UNITS)}, got {self.privacy_unit!r}")
        if self.ledger_id is not None and (
            not isinstance(self.ledger_id, str) or not _LEDGER_ID.match(self.ledger_id)
        ):
            raise bad("ledger_id must be an identifier or null")
        if not isinstance(self.created, str) or not _RFC3339_UTC.match(self.created):
            raise bad(f"created must be an RFC 3339 UTC time like 2026-01-31T12:00:00Z, got {self.created!r}")
        if not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in self.library_versions.items()
        ):
            raise bad("library_versions must map names to version strings or null")
        if not all(isinstance(n, str) for n in self.notes):
            raise bad("notes must be a list of strings")
        self._validate_signature_shape()
        events = _events_from_json(list(self.events))
        dp_fields = ("delta", "accountant", "noise_multiplier", "clip_norm", "noise_rng")
        if not self.dp_enabled:
            present = [name for name in (*dp_fields, "epsilon") if getattr(self, name) is not None]
            if present:
                raise bad(f"a run without DP-SGD must leave {', '.join(present)} null")
            if events:
                raise bad("a run without DP-SGD has no spending events")
            if self.sample_rate is not None:
                check_sample_rate(self.sample_rate)
            object.__setattr__(self, "private", False)
            return
        missing = [name for name in (*dp_fields, "sample_rate") if getattr(self, name) is None]
        if missing:
            raise bad(f"a DP-SGD run needs {', '.join(missing)}")
        if self.noise_rng not in NOISE_RNGS:
            raise bad(f"noise_rng must be one of {list(NOISE_RNGS)}")
        assert self.delta is not None and self.accountant is not None and self.sample_rate is not None
        validate_delta(check_delta(self.delta), self.dataset_size)
        if not isinstance(self.accountant, str):
            raise bad("accountant must be a string")
        get_accountant_class(self.accountant)
        check_noise_multiplier(self.noise_multiplier)
        clip = self.clip_norm
        if (
            isinstance(clip, bool)
            or not isinstance(clip, numbers.Real)
            or not math.isfinite(clip)
            or clip <= 0
        ):
            raise bad(f"clip_norm must be a finite number > 0, got {clip!r}")
        q = check_sample_rate(self.sample_rate)
        if sum(e.steps for e in events) != self.steps:
            raise bad(f"the events cover {sum(e.steps for e in events)} steps but steps is {self.steps}")
        if amplified:
            if b is not None and q != b / self.dataset_size:
                raise bad(
                    f"sample_rate {q!r} is not expected_batch_size / dataset_size = {b}/{self.dataset_size} "
                    f"= {b / self.dataset_size!r}"
                )
        elif q != 1.0:
            # Events of a shared ledger may hold earlier steps that the engine did sample; this
            # run's own steps (sample_rate) get no amplification.
            raise bad(
                "without Poisson sampling performed by the engine there is no sampling amplification: "
                "sample_rate must be 1"
            )
        private = self.noise_rng == "csprng"
        object.__setattr__(self, "private", private)
        if private:
            eps = self.epsilon
            if (
                isinstance(eps, bool)
                or not isinstance(eps, numbers.Real)
                or not math.isfinite(eps)
                or eps < 0
            ):
                raise bad(f"epsilon must be a finite number >= 0, got {eps!r}")
        elif self.epsilon is not None:
            raise bad("a run with deterministic noise has no ε guarantee: epsilon must be null")

    def _validate_signature_shape(self) -> None:
        sig = self.signature
        if sig is None:
            return
        if set(sig) != {"alg", "key_id", "value"} or not all(isinstance(v, str) for v in sig.values()):
            raise CertificateError("invalid DP certificate: signature needs exactly alg, key_id and value")
        if sig["alg"] != SIGNATURE_ALGORITHM:
            raise CertificateError(f"invalid DP certificate: unsupported signature algorithm {sig['alg']!r}")
        if not _KEY_ID.match(sig["key_id"]):
            raise CertificateError("invalid DP certificate: signature key_id must be lower-case hex")

    # ------------------------------------------------------------------ construction
    @classmethod
    def issue(
        cls,
        *,
        accountant: str,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        steps: int,
        delta: float,
        dataset_size: int,
        dataset_size_source: str,
        expected_batch_size: int | None,
        sampling_method: SamplingMethod | str,
        sampled_by: str,
        noise_rng: str = "csprng",
        privacy_unit: str = "example",
        events: Sequence[DpSgdEvent] | None = None,
        ledger_id: str | None = None,
        notes: Iterable[str] = (),
    ) -> Self:
        """Compute ε with ``accountant`` and return the (unsigned) certificate of a DP-SGD run.

        ``events`` default to one record of ``steps`` steps at ``noise_multiplier`` and
        ``sample_rate``. With ``noise_rng="deterministic"`` the certificate says
        ``private: false`` and holds no ε.

        Raises:
            CertificateError: If a field is invalid (including δ >= 1/N, a sample rate that
                does not follow from who sampled, or events that do not add up to ``steps``).
        """
        method = SamplingMethod(sampling_method)
        history = (
            (DpSgdEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),)
            if events is None
            else tuple(events)
        )
        merged = _merge(history)
        eps: float | None = None
        if noise_rng == "csprng":
            try:
                eps = _epsilon_of(accountant, merged, delta)
            except PrivacyError as exc:
                raise CertificateError(f"cannot issue DP certificate: {exc}") from None
        return cls(
            dp_enabled=True,
            epsilon=eps,
            delta=float(delta),
            accountant=accountant,
            noise_multiplier=float(noise_multiplier),
            clip_norm=float(clip_norm),
            sample_rate=float(sample_rate),
            steps=steps,
            events=tuple(_event_json(e) for e in merged),
            dataset_size=dataset_size,
            dataset_size_source=dataset_size_source,
            expected_batch_size=expected_batch_size,
            sampling_method=method.value,
            sampled_by=sampled_by,
            noise_rng=noise_rng,
            privacy_unit=privacy_unit,
            ledger_id=ledger_id,
            notes=tuple(notes),
        )

    @classmethod
    def non_private(
        cls,
        *,
        steps: int,
        dataset_size: int,
        dataset_size_source: str,
        expected_batch_size: int | None,
        sample_rate: float | None,
        sampling_method: SamplingMethod | str,
        sampled_by: str,
        privacy_unit: str = "example",
        ledger_id: str | None = None,
        notes: Iterable[str] = (),
    ) -> Self:
        """Return the certificate of a run without DP-SGD (ε infinite, stated explicitly)."""
        return cls(
            dp_enabled=False,
            epsilon=None,
            delta=None,
            accountant=None,
            noise_multiplier=None,
            clip_norm=None,
            sample_rate=None if sample_rate is None else float(sample_rate),
            steps=steps,
            dataset_size=dataset_size,
            dataset_size_source=dataset_size_source,
            expected_batch_size=expected_batch_size,
            sampling_method=SamplingMethod(sampling_method).value,
            sampled_by=sampled_by,
            noise_rng=None,
            privacy_unit=privacy_unit,
            ledger_id=ledger_id,
            notes=(*notes, "DP-SGD was disabled: no privacy accounting applies."),
        )

    # ------------------------------------------------------------------ checks
    def event_records(self) -> tuple[DpSgdEvent, ...]:
        """The spending records ε composes, as :class:`DpSgdEvent` objects."""
        return _events_from_json(list(self.events))

    def recompute_epsilon(self) -> float:
        """Recompute ε from ``events`` with the recorded accountant.

        Raises:
            CertificateError: If the run has no ε (no DP-SGD, or deterministic noise), or the
                recomputed ε differs from the recorded one by more than 1e-9 relative (the
                certificate was edited, or another accounting library version gives another
                result).
        """
        if not self.private:
            raise CertificateError(
                "this run has no differential privacy guarantee: ε is infinite, there is nothing to recompute"
            )
        assert self.accountant is not None and self.delta is not None and self.epsilon is not None
        eps = _epsilon_of(self.accountant, self.event_records(), self.delta)
        if not math.isclose(eps, self.epsilon, rel_tol=1e-9, abs_tol=1e-12):
            raise CertificateError(
                f"recorded ε={self.epsilon!r} does not match ε={eps!r} recomputed with the "
                f"{self.accountant} accountant from the recorded events"
            )
        return eps

    # ------------------------------------------------------------------ signature
    def signed_message(self) -> bytes:
        """The bytes the signature covers: canonical JSON (RFC 8785) without ``signature``."""
        body = self.to_dict()
        del body["signature"]
        try:
            return canonical_json(body, allow_floats=True)
        except CanonicalJSONError as exc:
            raise CertificateError(f"the certificate cannot be canonicalised: {exc}") from None

    def sign(self, signer: CertificateSigner) -> Self:
        """Return a copy signed by ``signer`` (the deployment's hybrid signing key)."""
        message = self.signed_message()
        signature = signer.sign(message, context=SIGNATURE_CONTEXT)
        key_id = signer.verifying_key().key_id
        return dataclasses.replace(
            self,
            signature={
                "alg": SIGNATURE_ALGORITHM,
                "key_id": key_id,
                "value": base64.b64encode(bytes(signature)).decode("ascii"),
            },
        )

    def verify_signature(self, verifier: CertificateVerifier | Sequence[CertificateVerifier]) -> str:
        """Check the signature with the given public key(s); return the signing key id.

        Raises:
            CertificateError: The certificate is unsigned, signed by a key that is not given,
                or the signature does not verify (modified certificate or forged signature).
        """
        keys = [verifier] if not isinstance(verifier, Sequence) else list(verifier)
        if not keys:
            raise CertificateError("no public key given: pass the deployment's public key to verify")
        sig = self.signature
        if sig is None:
            raise CertificateError("the certificate is not signed; it cannot be verified")
        by_id = {k.key_id: k for k in keys}
        key = by_id.get(sig["key_id"])
        if key is None:
            raise CertificateError(
                f"the certificate is signed by key {sig['key_id']}, which is not among the given public keys "
                f"({', '.join(sorted(by_id))})"
            )
        try:
            value = base64.b64decode(sig["value"], validate=True)
            key.verify(value, self.signed_message(), context=SIGNATURE_CONTEXT)
        except (binascii.Error, ValueError, CertificateError):
            raise CertificateError("the certificate signature is invalid (modified or forged)") from None
        except Exception:  # any verifier failure is a bad signature: fail closed
            raise CertificateError("the certificate signature is invalid (modified or forged)") from None
        return sig["key_id"]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of the certificate (keys in the documented order)."""
        out: dict[str, Any] = {}
        for name in _KEY_ORDER:
            value = getattr(self, name)
            if name in ("notes", "events"):
                value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            elif name in ("library_versions", "signature") and value is not None:
                value = dict(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Parse and validate a certificate JSON object.

        Raises:
            CertificateError: On an unknown schema, missing or unknown keys, a bad value or
                a derived field (statement, private, amplification) that does not match.
        """
        if not isinstance(data, dict):
            raise CertificateError("invalid DP certificate: expected a JSON object")
        schema = data.get("schema")
        if schema == _V1_SCHEMA:
            raise CertificateError(
                "this is a v1 certificate (tensafe.dp_certificate/v1); v1 could state a conditional ε for "
                "batches the client chose and is no longer accepted: issue a v2 certificate from the run"
            )
        if schema != CERTIFICATE_SCHEMA:
            raise CertificateError(
                f"invalid DP certificate: unsupported schema {schema!r}; "
                f"this TenSafe reads {CERTIFICATE_SCHEMA!r}"
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise CertificateError(f"invalid DP certificate: unknown keys {unknown}, missing keys {missing}")
        for name in ("notes", "events"):
            if not isinstance(data[name], list):
                raise CertificateError(f"invalid DP certificate: {name} must be a list")
        if not isinstance(data["library_versions"], dict):
            raise CertificateError("invalid DP certificate: library_versions must be an object")
        if data["signature"] is not None and not isinstance(data["signature"], dict):
            raise CertificateError("invalid DP certificate: signature must be an object or null")
        derived = ("statement", "private", "amplification")
        kwargs = {k: v for k, v in data.items() if k not in derived}
        kwargs["notes"] = tuple(data["notes"])
        kwargs["events"] = tuple(data["events"])
        try:
            cert = cls(**kwargs)
        except TypeError as exc:  # a wrong JSON type reaching a check that assumed another
            raise CertificateError(f"invalid DP certificate: {exc}") from None
        for name in derived:
            if data[name] != getattr(cert, name):
                raise CertificateError(
                    f"invalid DP certificate: {name} does not match the recorded fields "
                    f"(expected {getattr(cert, name)!r})"
                )
        return cert

    def to_json(self) -> str:
        """Return the JSON text (indented, UTF-8 characters kept, newline-terminated)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the certificate atomically: temporary file, fsync, rename, fsync of the folder.

        Returns:
            The path written.
        """
        target = Path(path)
        data = self.to_json().encode("utf-8")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    @classmethod
    def from_json_bytes(cls, raw: bytes, *, source: str = "DP certificate") -> Self:
        """Parse a certificate from JSON bytes (at most 1 MiB).

        Raises:
            CertificateError: If the bytes are too large, not JSON or not a valid certificate.
        """
        if len(raw) > _MAX_FILE_BYTES:
            raise CertificateError(f"{source} is larger than {_MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CertificateError(f"{source} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Self:
        """Read and validate a certificate file.

        Raises:
            CertificateError: If the file is missing, too large, not JSON or not a valid
                certificate.
        """
        p = Path(path)
        try:
            with p.open("rb") as handle:
                raw = handle.read(_MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise CertificateError(f"cannot read DP certificate {p}: {exc.strerror or exc}") from None
        return cls.from_json_bytes(raw, source=f"DP certificate {p}")


#: The order of the members in the JSON object (the reading order of docs/privacy.md).
_KEY_ORDER = (
    "schema",
    "private",
    "dp_enabled",
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "clip_norm",
    "sample_rate",
    "amplification",
    "steps",
    "events",
    "dataset_size",
    "dataset_size_source",
    "expected_batch_size",
    "sampling_method",
    "sampled_by",
    "noise_rng",
    "privacy_unit",
    "ledger_id",
    "created",
    "library_versions",
    "notes",
    "statement",
    "signature",
)
assert set(_KEY_ORDER) == {f.name for f in fields(DpCertificate)}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")
