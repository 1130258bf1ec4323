"""The differential-privacy policy a training run is held to (torch-free).

:class:`DpPolicy` states what the platform enforces; :mod:`tensafe.privacy.plan` turns it,
with the data set size, into the run's concrete σ, sampling rate and budget. The server
builds a :class:`DpPolicy` from the operator's configuration and the tenant's policy
(combined with :meth:`DpPolicy.stricter_of`), then applies what the client asked for with
:meth:`DpPolicy.tighten`, which refuses any change that would weaken the guarantee.

"Stricter" is defined field by field:

* ``target_epsilon``, ``delta``: smaller is stricter.
* ``noise_multiplier``: larger is stricter; ``None`` (calibrated to reach ``target_epsilon``
  after ``max_steps``) may be replaced by any explicit value, because the ε budget still
  caps the run.
* ``clip_norm``: smaller is stricter (less influence of one example).
* ``expected_batch_size``: smaller is stricter. With ``server_poisson`` it sets the sampling
  rate ``q = B / N`` that the engine enforces; with client-chosen batches it is only the
  normaliser of the noisy gradient sum (ε is computed without amplification, q = 1, whatever
  B and N say).
* ``dataset_size``: smaller is stricter (δ must stay below 1/N; with ``server_poisson`` a larger
  N would lower q). Where it came from (``dataset_size_source``) is recorded, not compared.
* ``max_steps``: smaller is stricter; ``None`` means "until the budget is spent".
* ``sampling``: ``"server_poisson"`` (the engine samples, verified) is stricter than
  ``"client_chosen_batches"`` (the client picks the batches, unverifiable).
* ``accountant``: cannot be changed by a client (operators choose how ε is computed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, Self

from tensafe.privacy._validation import validate_delta
from tensafe.privacy.accountants import available_accountants
from tensafe.privacy.errors import DpPolicyError, PolicyLoosenedError, PrivacyError

__all__ = ["SAMPLING_MODES", "DpPolicy", "SamplingMode"]

SamplingMode = Literal["client_chosen_batches", "server_poisson"]
SAMPLING_MODES: tuple[str, ...] = ("client_chosen_batches", "server_poisson")
#: ``declared`` by the client or the tenant's policy, or the operator's default.
DATASET_SIZE_SOURCES: tuple[str, ...] = ("declared", "defaulted")


def _positive_number(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise DpPolicyError(f"DP policy {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DpPolicyError(f"DP policy {name} must be a positive integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpPolicy:
    """DP-SGD parameters enforced by the platform for one training session.

    Attributes:
        target_epsilon: ε budget of the run; the step that would exceed it is refused.
        delta: δ in (0, 1); must be below ``1 / dataset_size`` when N is known.
        clip_norm: Per-example (per-``Datum``) L2 clip norm ``C``.
        accountant: Registered accountant name (``rdp``, ``moments``, ``pld``, ``prv``).
        noise_multiplier: σ; ``None`` calibrates the smallest σ that reaches ``target_epsilon``
            after exactly ``max_steps`` steps.
        dataset_size: N, the number of privacy units. Required for ``client_chosen_batches``
            (the client declares it); for ``server_poisson`` it is taken from the registered
            data set (and, when given here, must match it).
        sampling: ``"client_chosen_batches"`` (default; the honest accounting: the engine does
            not sample and the certificate says so) or ``"server_poisson"``.
        expected_batch_size: ``B``; the sampling rate is ``q = B / N`` and the noisy gradient
            sum is divided by ``B`` (never by the realised batch size).
        max_steps: Optional cap on optimizer steps; required when ``noise_multiplier`` is None.
        dataset_size_source: ``declared`` (by the client or the tenant) or ``defaulted`` (the
            operator's floor); stated in the certificate, never part of the strictness order.
    """

    target_epsilon: float
    delta: float
    clip_norm: float
    accountant: str = "rdp"
    noise_multiplier: float | None = None
    dataset_size: int | None = None
    sampling: SamplingMode = "client_chosen_batches"
    expected_batch_size: int
    max_steps: int | None = None
    dataset_size_source: str = "declared"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_epsilon", _positive_number("target_epsilon", self.target_epsilon))
        object.__setattr__(self, "clip_norm", _positive_number("clip_norm", self.clip_norm))
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or not 0 < d < 1:
            raise DpPolicyError(f"DP policy delta must be in (0, 1), got {d!r}")
        object.__setattr__(self, "delta", float(d))
        if not isinstance(self.accountant, str) or self.accountant not in available_accountants():
            raise DpPolicyError(
                f"DP policy accountant {self.accountant!r} is unknown; choose one of "
                f"{', '.join(available_accountants())}"
            )
        if self.noise_multiplier is not None:
            object.__setattr__(
                self, "noise_multiplier", _positive_number("noise_multiplier", self.noise_multiplier)
            )
        if self.dataset_size_source not in DATASET_SIZE_SOURCES:
            raise DpPolicyError(
                f"DP policy dataset_size_source must be one of {', '.join(DATASET_SIZE_SOURCES)}, "
                f"got {self.dataset_size_source!r}"
            )
        if self.sampling not in SAMPLING_MODES:
            raise DpPolicyError(
                f"DP policy sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.sampling!r}"
            )
        _positive_int("expected_batch_size", self.expected_batch_size)
        if self.dataset_size is not None:
            _positive_int("dataset_size", self.dataset_size)
            if self.expected_batch_size > self.dataset_size:
                raise DpPolicyError(
                    f"DP policy expected_batch_size {self.expected_batch_size} exceeds dataset_size "
                    f"{self.dataset_size}"
                )
            try:
                validate_delta(self.delta, self.dataset_size)
            except PrivacyError as exc:
                raise DpPolicyError(f"DP policy: {exc}") from None
        elif self.sampling == "client_chosen_batches":
            raise DpPolicyError(
                "DP policy with client-chosen batches needs dataset_size (N, the number of privacy "
                "units) to compute the sampling rate q = expected_batch_size / N"
            )
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps)
        elif self.noise_multiplier is None:
            raise DpPolicyError(
                "DP policy needs either noise_multiplier or max_steps (to calibrate the noise for "
                "target_epsilon)"
            )

    # ------------------------------------------------------------------ derived
    def sample_rate(self, dataset_size: int | None = None) -> float:
        """Return ``q = expected_batch_size / N`` (N from the policy unless given)."""
        n = dataset_size if dataset_size is not None else self.dataset_size
        if n is None:
            raise DpPolicyError("the sampling rate is unknown until the data set is registered")
        return self.expected_batch_size / n

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping that :meth:`from_dict` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a policy from :meth:`to_dict` output.

        Raises:
            DpPolicyError: If a field is missing, unknown or invalid.
        """
        if not isinstance(data, Mapping):
            raise DpPolicyError("a DP policy must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DpPolicyError(f"unknown DP policy field(s): {', '.join(map(str, unknown))}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise DpPolicyError(f"invalid DP policy: {exc}") from None

    # ------------------------------------------------------------------ strictness
    @staticmethod
    def _loosened(base: DpPolicy, new: DpPolicy) -> list[str]:
        """Return a description of every field in which ``new`` is weaker than ``base``."""
        out: list[str] = []

        def smaller_is_stricter(name: str, a: float | None, b: float | None) -> None:
            if a is not None and (b is None or b > a):
                out.append(f"{name} {b!r} is looser than {a!r}")

        smaller_is_stricter("target_epsilon", base.target_epsilon, new.target_epsilon)
        smaller_is_stricter("delta", base.delta, new.delta)
        smaller_is_stricter("clip_norm", base.clip_norm, new.clip_norm)
        smaller_is_stricter("expected_batch_size", base.expected_batch_size, new.expected_batch_size)
        smaller_is_stricter("dataset_size", base.dataset_size, new.dataset_size)
        smaller_is_stricter("max_steps", base.max_steps, new.max_steps)
        if base.noise_multiplier is not None and (
            new.noise_multiplier is None or new.noise_multiplier < base.noise_multiplier
        ):
            out.append(f"noise_multiplier {new.noise_multiplier!r} is looser than {base.noise_multiplier!r}")
        if base.sampling == "server_poisson" and new.sampling != "server_poisson":
            out.append("sampling 'client_chosen_batches' is looser than 'server_poisson'")
        if new.accountant != base.accountant:
            out.append(
                f"accountant {new.accountant!r} differs from {base.accountant!r} (set by the operator)"
            )
        return out

    def is_at_least_as_strict_as(self, other: DpPolicy) -> bool:
        """Return whether this policy is at least as strict as ``other`` in every field."""
        return not self._loosened(other, self)

    def tighten(self, **changes: Any) -> DpPolicy:
        """Return a copy with ``changes`` applied, refusing any change that loosens the policy.

        Args:
            **changes: Field names and their requested values (e.g. ``target_epsilon=2.0``).

        Raises:
            PolicyLoosenedError: Naming every field the change would loosen.
            DpPolicyError: If a field is unknown or the result is invalid.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise DpPolicyError(f"unknown DP policy field(s): {', '.join(unknown)}")
        new = dataclasses.replace(self, **changes)
        loosened = self._loosened(self, new)
        if loosened:
            raise PolicyLoosenedError(
                "a client can only make the privacy policy stricter: " + "; ".join(loosened)
            )
        return new

    @classmethod
    def stricter_of(cls, a: DpPolicy, b: DpPolicy) -> DpPolicy:
        """Combine two policies field by field, keeping the stricter value of each.

        Use it to combine the operator's floor with a tenant's policy.

        Raises:
            PolicyLoosenedError: If the two policies use different accountants (their ε are
                not comparable).
            DpPolicyError: If the combination is invalid.
        """
        if a.accountant != b.accountant:
            raise PolicyLoosenedError(
                f"cannot combine DP policies with different accountants ({a.accountant!r}, {b.accountant!r})"
            )

        def lo(x: Any, y: Any) -> Any:
            if x is None:
                return y
            if y is None:
                return x
            return min(x, y)

        sigma: float | None
        if a.noise_multiplier is None or b.noise_multiplier is None:
            sigma = a.noise_multiplier if b.noise_multiplier is None else b.noise_multiplier
            if a.noise_multiplier is None and b.noise_multiplier is None:
                sigma = None
        else:
            sigma = max(a.noise_multiplier, b.noise_multiplier)
        sampling: SamplingMode = (
            "server_poisson" if "server_poisson" in (a.sampling, b.sampling) else "client_chosen_batches"
        )
        return cls(
            target_epsilon=min(a.target_epsilon, b.target_epsilon),
            delta=min(a.delta, b.delta),
            clip_norm=min(a.clip_norm, b.clip_norm),
            accountant=a.accountant,
            noise_multiplier=sigma,
            dataset_size=lo(a.dataset_size, b.dataset_size),
            sampling=sampling,
            expected_batch_size=min(a.expected_batch_size, b.expected_batch_size),
            max_steps=lo(a.max_steps, b.max_steps),
            dataset_size_source=_source_of_smaller_n(a, b),
        )


def _source_of_smaller_n(a: DpPolicy, b: DpPolicy) -> str:
    """Where the N that :meth:`DpPolicy.stricter_of` keeps came from."""
    if a.dataset_size is None or (b.dataset_size is not None and b.dataset_size < a.dataset_size):
        return b.dataset_size_source if b.dataset_size is not None else a.dataset_size_source
    if b.dataset_size is None or a.dataset_size < b.dataset_size:
        return a.dataset_size_source
    return "declared" if "declared" in (a.dataset_size_source, b.dataset_size_source) else "defaulted"
