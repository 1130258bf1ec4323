"""The DP certificate: a versioned JSON statement of a run's privacy guarantee.

A certificate (``dp_certificate.json``, schema ``tensafe.dp_certificate/v1``) records
what was proven about one training run: the (ε, δ) pair, the accountant, every
parameter the accountant used, how batches were sampled and by whom, and the privacy
unit. ``statement`` is a sentence derived from those fields by a fixed v1 rule (see
``docs/privacy.md``); :meth:`DpCertificate.from_dict` rejects a certificate whose
statement does not match its fields, an unknown schema, unknown keys or values out of
range. A run without DP gets a certificate too, with ``dp_enabled = false``,
``epsilon = null`` (ε is infinite) and a statement saying there is no guarantee.

The JSON Schema is shipped as ``dp_certificate.schema.json`` next to this module.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from tensafe._version import __version__
from tensafe.privacy._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    validate_delta,
)
from tensafe.privacy.accountants.registry import get_accountant_class
from tensafe.privacy.calibration import compute_epsilon
from tensafe.privacy.errors import CertificateError, PrivacyError
from tensafe.privacy.events import SamplingMethod

__all__ = ["CERTIFICATE_FILENAME", "CERTIFICATE_SCHEMA", "DpCertificate", "schema_path"]

#: Schema identifier written in every certificate of this version.
CERTIFICATE_SCHEMA = "tensafe.dp_certificate/v1"
#: The conventional file name.
CERTIFICATE_FILENAME = "dp_certificate.json"
#: Distributions whose versions are recorded (the ones absent are recorded as null).
_TRACKED_DISTRIBUTIONS = ("torch", "dp-accounting", "prv-accountant", "opacus", "peft", "transformers")
_MAX_FILE_BYTES = 1 << 20
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
_PRIVACY_UNITS = ("example",)


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
    """Return the v1 statement sentence for ``cert`` (wording frozen for schema v1)."""
    if not cert.dp_enabled:
        return (
            "No differential privacy guarantee: this run trained without DP-SGD, so ε is infinite "
            f"for each training {cert.privacy_unit}."
        )
    assert cert.epsilon is not None and cert.delta is not None and cert.accountant is not None
    head = f"(ε={cert.epsilon:.3g}, δ={cert.delta:g})-DP for each training {cert.privacy_unit}"
    acct = _title(cert.accountant)
    if cert.sampling_method == SamplingMethod.POISSON.value and cert.sampling_performed_by_engine:
        return f"{head} under Poisson sampling performed by the engine ({acct})."
    how = _SAMPLING_PHRASES[SamplingMethod(cert.sampling_method)]
    who = "performed" if cert.sampling_performed_by_engine else "did not perform"
    return (
        f"{head} only if every batch was drawn by Poisson sampling at rate q={cert.sample_rate:g}; "
        f"here the batches were {how} and the engine {who} the sampling ({acct})."
    )


_SAMPLING_PHRASES = {
    SamplingMethod.POISSON: "Poisson-sampled",
    SamplingMethod.SHUFFLED: "fixed-size batches of shuffled data",
    SamplingMethod.CLIENT_CHOSEN_BATCHES: "chosen by the client",
}


@dataclass(frozen=True)
class DpCertificate:
    """Privacy guarantee of one training run (schema ``tensafe.dp_certificate/v1``).

    Build one with :meth:`issue` (DP run; ε is computed here, never passed in) or
    :meth:`non_private` (no DP), then :meth:`write` it. Every field is validated on
    construction; ``statement`` is derived and must not be passed.

    Attributes:
        schema: Always :data:`CERTIFICATE_SCHEMA`.
        dp_enabled: Whether DP-SGD ran.
        epsilon: ε (``None`` when DP is off: infinite).
        delta: δ (``None`` when DP is off).
        accountant: Accountant name (``None`` when DP is off).
        noise_multiplier: σ (``None`` when DP is off).
        clip_norm: Per-example gradient clip norm C (``None`` when DP is off).
        sample_rate: q, the expected batch size over the data set size.
        steps: Optimizer steps taken.
        dataset_size: N, the number of privacy units in the training set.
        expected_batch_size: q·N, rounded as the trainer configured it.
        sampling_method: A :class:`~tensafe.privacy.events.SamplingMethod` value.
        sampling_performed_by_engine: Whether TenSafe itself drew the batches.
        privacy_unit: What one neighbouring data set differs in; v1 supports ``"example"``.
        created: RFC 3339 UTC timestamp (``YYYY-MM-DDTHH:MM:SSZ``).
        library_versions: Versions of tensafe and of the libraries the guarantee depends on.
        notes: Free-text remarks, in order.
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
    expected_batch_size: int | None
    sampling_method: str
    sampling_performed_by_engine: bool
    privacy_unit: str = "example"
    created: str = field(default_factory=_now_rfc3339)
    library_versions: Mapping[str, str | None] = field(default_factory=_library_versions)
    notes: tuple[str, ...] = ()
    schema: str = CERTIFICATE_SCHEMA
    statement: str = field(init=False, default="")

    def __post_init__(self) -> None:
        try:
            self._validate()
        except PrivacyError as exc:
            if isinstance(exc, CertificateError):
                raise
            raise CertificateError(f"invalid DP certificate: {exc}") from None
        object.__setattr__(self, "library_versions", dict(self.library_versions))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "statement", _statement(self))

    def _validate(self) -> None:
        def bad(msg: str) -> CertificateError:
            return CertificateError(f"invalid DP certificate: {msg}")

        if self.schema != CERTIFICATE_SCHEMA:
            raise bad(f"unsupported schema {self.schema!r}; this TenSafe reads {CERTIFICATE_SCHEMA!r}")
        for name in ("dp_enabled", "sampling_performed_by_engine"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false")
        check_steps(self.steps)
        if (
            isinstance(self.dataset_size, bool)
            or not isinstance(self.dataset_size, int)
            or self.dataset_size < 1
        ):
            raise bad(f"dataset_size must be a positive integer, got {self.dataset_size!r}")
        if self.expected_batch_size is not None and (
            isinstance(self.expected_batch_size, bool)
            or not isinstance(self.expected_batch_size, int)
            or self.expected_batch_size < 1
        ):
            raise bad(
                f"expected_batch_size must be a positive integer or null, got {self.expected_batch_size!r}"
            )
        try:
            SamplingMethod(self.sampling_method)
        except ValueError:
            raise bad(
                f"unknown sampling_method {self.sampling_method!r}; "
                f"expected one of {[m.value for m in SamplingMethod]}"
            ) from None
        if self.privacy_unit not in _PRIVACY_UNITS:
            raise bad(f"privacy_unit must be one of {list(_PRIVACY_UNITS)}, got {self.privacy_unit!r}")
        if not isinstance(self.created, str) or not _RFC3339_UTC.match(self.created):
            raise bad(f"created must be an RFC 3339 UTC time like 2026-01-31T12:00:00Z, got {self.created!r}")
        if not isinstance(self.library_versions, Mapping) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in self.library_versions.items()
        ):
            raise bad("library_versions must map names to version strings or null")
        if isinstance(self.notes, str) or not all(isinstance(n, str) for n in self.notes):
            raise bad("notes must be a list of strings")
        if self.sample_rate is not None:
            check_sample_rate(self.sample_rate)
        dp_fields = ("epsilon", "delta", "accountant", "noise_multiplier", "clip_norm")
        if not self.dp_enabled:
            present = [name for name in dp_fields if getattr(self, name) is not None]
            if present:
                raise bad(f"a run without DP must leave {', '.join(present)} null")
            return
        missing = [name for name in (*dp_fields, "sample_rate") if getattr(self, name) is None]
        if missing:
            raise bad(f"a DP run needs {', '.join(missing)}")
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
            raise bad(f"epsilon must be a finite number >= 0, got {eps!r}")
        assert self.delta is not None and self.accountant is not None
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
        expected_batch_size: int | None,
        sampling_method: SamplingMethod | str,
        sampling_performed_by_engine: bool,
        notes: Iterable[str] = (),
    ) -> Self:
        """Compute ε with ``accountant`` and return the certificate of a DP run.

        ε is always computed under the Poisson-sampling analysis. When the engine did
        not draw Poisson batches itself, the statement says the guarantee holds only if
        the batches were in fact Poisson-sampled at rate q.

        Raises:
            CertificateError: If a field is invalid (including δ >= 1/N).
        """
        method = SamplingMethod(sampling_method)
        try:
            eps = compute_epsilon(
                accountant=accountant,
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
            )
        except PrivacyError as exc:
            raise CertificateError(f"cannot issue DP certificate: {exc}") from None
        extra: list[str] = []
        if method is not SamplingMethod.POISSON or not sampling_performed_by_engine:
            extra.append(
                "ε was computed for Poisson sampling; the engine did not perform Poisson sampling "
                "for this run, so the guarantee is conditional on how the batches were drawn."
            )
        return cls(
            dp_enabled=True,
            epsilon=eps,
            delta=float(delta),
            accountant=accountant,
            noise_multiplier=float(noise_multiplier),
            clip_norm=float(clip_norm),
            sample_rate=float(sample_rate),
            steps=steps,
            dataset_size=dataset_size,
            expected_batch_size=expected_batch_size,
            sampling_method=method.value,
            sampling_performed_by_engine=sampling_performed_by_engine,
            notes=(*notes, *extra),
        )

    @classmethod
    def non_private(
        cls,
        *,
        steps: int,
        dataset_size: int,
        expected_batch_size: int | None,
        sample_rate: float | None,
        sampling_method: SamplingMethod | str,
        sampling_performed_by_engine: bool,
        notes: Iterable[str] = (),
    ) -> Self:
        """Return the certificate of a run without DP (ε infinite, stated explicitly)."""
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
            expected_batch_size=expected_batch_size,
            sampling_method=SamplingMethod(sampling_method).value,
            sampling_performed_by_engine=sampling_performed_by_engine,
            notes=(*notes, "DP-SGD was disabled: no privacy accounting applies."),
        )

    def recompute_epsilon(self) -> float:
        """Recompute ε from the recorded parameters with the recorded accountant.

        Raises:
            CertificateError: If DP is off, or the recomputed ε differs from the recorded
                one by more than 1e-9 relative (the certificate was edited, or another
                accounting library version gives another result).
        """
        if not self.dp_enabled:
            raise CertificateError("this run had no DP: ε is infinite, there is nothing to recompute")
        assert self.accountant and self.noise_multiplier and self.sample_rate and self.delta
        assert self.epsilon is not None
        eps = compute_epsilon(
            accountant=self.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
        )
        if not math.isclose(eps, self.epsilon, rel_tol=1e-9, abs_tol=1e-12):
            raise CertificateError(
                f"recorded ε={self.epsilon!r} does not match ε={eps!r} recomputed with the "
                f"{self.accountant} accountant from the recorded parameters"
            )
        return eps

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of the certificate (keys in schema order)."""
        out: dict[str, Any] = {"schema": self.schema}
        for f in fields(self):
            if f.name == "schema":
                continue
            value = getattr(self, f.name)
            if f.name == "notes":
                value = list(value)
            elif f.name == "library_versions":
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Parse and validate a certificate JSON object.

        Raises:
            CertificateError: On an unknown schema, missing or unknown keys, a bad value or
                a statement that does not match the fields.
        """
        if not isinstance(data, dict):
            raise CertificateError("invalid DP certificate: expected a JSON object")
        schema = data.get("schema")
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
        notes = data["notes"]
        if not isinstance(notes, list):
            raise CertificateError("invalid DP certificate: notes must be a list of strings")
        kwargs = {k: v for k, v in data.items() if k != "statement"}
        kwargs["notes"] = tuple(notes)
        cert = cls(**kwargs)
        if data["statement"] != cert.statement:
            raise CertificateError(
                "invalid DP certificate: the statement does not match the recorded fields "
                f"(expected {cert.statement!r})"
            )
        return cert

    def to_json(self) -> str:
        """Return the canonical JSON text (indented, UTF-8 characters kept, newline-terminated)."""
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
        if len(raw) > _MAX_FILE_BYTES:
            raise CertificateError(f"DP certificate {p} is larger than {_MAX_FILE_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CertificateError(f"DP certificate {p} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")
