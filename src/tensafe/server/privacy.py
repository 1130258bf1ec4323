"""Privacy policies of the training API: operator defaults, tenant policies, client tightening.

The effective policy of a new training model is
``DpPolicy.stricter_of(operator, tenant).tighten(**client_request)``:

* the operator's defaults come from :class:`OperatorPrivacy` (``TS_DP_*`` variables);
* a tenant's policy is a ``privacy_policies`` row, set with
  ``tensafe admin set-privacy-policy``;
* a client may only make it stricter, through ``tensafe.dp.<field>`` keys of the
  ``user_metadata`` it sends with ``create_model`` (see ``docs/server.md``).

Training without DP requires that both the operator and the tenant allow it *and* that
the client asks for it (``tensafe.dp.enabled = "false"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from tensafe.db import utcnow
from tensafe.server.errors import BadRequestError, ServerConfigurationError, TenantAdminError
from tensafe.server.models import PrivacyPolicyRow, TrainingModel

__all__ = [
    "CLIENT_PREFIX",
    "EffectivePolicy",
    "OperatorPrivacy",
    "client_request",
    "effective_policy",
    "model_certificate",
    "model_privacy_spent",
    "set_tenant_policy",
    "tenant_row",
]

#: ``user_metadata`` keys with this prefix request a stricter policy (values are strings).
CLIENT_PREFIX = "tensafe.dp."
_FLOAT_FIELDS = ("target_epsilon", "delta", "clip_norm", "noise_multiplier")
_INT_FIELDS = ("dataset_size", "expected_batch_size", "max_steps")


@dataclass(frozen=True)
class OperatorPrivacy:
    """The operator's privacy floor, applied to every tenant (``TS_DP_*`` variables).

    Attributes:
        target_epsilon: Largest ε any run may reach.
        delta: Largest δ.
        clip_norm: Largest per-example clip norm.
        accountant: The accountant every policy uses.
        dataset_size: Largest data set size N a run may claim (smaller N is stricter).
        expected_batch_size: Largest expected batch size B.
        max_steps: Largest number of optimizer steps (the noise is calibrated for it).
        allow_non_private: Whether any tenant may train without DP at all.
    """

    target_epsilon: float = 8.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "rdp"
    dataset_size: int = 50_000
    expected_batch_size: int = 256
    max_steps: int = 10_000
    allow_non_private: bool = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> OperatorPrivacy:
        """Read ``TS_DP_TARGET_EPSILON``, ``TS_DP_DELTA``, ``TS_DP_CLIP_NORM``, ``TS_DP_ACCOUNTANT``,
        ``TS_DP_DATASET_SIZE``, ``TS_DP_EXPECTED_BATCH_SIZE``, ``TS_DP_MAX_STEPS`` and
        ``TS_DP_ALLOW_NON_PRIVATE`` (``1``/``true``); unset variables keep the defaults.

        Raises:
            ServerConfigurationError: A value is malformed or the policy is invalid.
        """
        values: dict[str, Any] = {}
        for name in (*_FLOAT_FIELDS[:3], "accountant", *_INT_FIELDS, "allow_non_private"):
            raw = env.get(f"TS_DP_{name.upper()}", "").strip()
            if not raw:
                continue
            try:
                if name in _FLOAT_FIELDS:
                    values[name] = float(raw)
                elif name in _INT_FIELDS:
                    values[name] = int(raw)
                elif name == "allow_non_private":
                    if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                        raise ValueError(raw)
                    values[name] = raw.lower() in ("1", "true", "yes")
                else:
                    values[name] = raw
            except ValueError:
                raise ServerConfigurationError(
                    f"TS_DP_{name.upper()}={raw!r} is not a valid {name}"
                ) from None
        operator = cls(**values)
        operator.policy()  # validate now: a server must not start with a broken floor
        return operator

    def policy(self) -> Any:
        """Return the floor as a :class:`~tensafe.privacy.DpPolicy`.

        Raises:
            ServerConfigurationError: The values do not form a valid policy.
        """
        from tensafe.privacy import DpPolicy, DpPolicyError

        try:
            return DpPolicy(
                target_epsilon=self.target_epsilon,
                delta=self.delta,
                clip_norm=self.clip_norm,
                accountant=self.accountant,
                dataset_size=self.dataset_size,
                expected_batch_size=self.expected_batch_size,
                max_steps=self.max_steps,
                dataset_size_source="defaulted",
            )
        except DpPolicyError as exc:
            raise ServerConfigurationError(
                f"the operator's privacy policy (TS_DP_*) is invalid: {exc}"
            ) from None


@dataclass(frozen=True)
class EffectivePolicy:
    """The policy a training model runs under.

    Attributes:
        policy: The DP policy, or None when the run is explicitly non-private.
        source: Where it came from (``operator``, ``operator+tenant``, plus ``+client``).
    """

    policy: Any
    source: str

    def to_json(self) -> str:
        """Serialize for ``training_models.dp_policy``."""
        data = None if self.policy is None else self.policy.to_dict()
        return json.dumps({"policy": data, "source": self.source}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> EffectivePolicy:
        """Read what :meth:`to_json` wrote.

        Raises:
            ValueError: ``text`` is empty (a model created before 0004_privacy).
        """
        from tensafe.privacy import DpPolicy

        if not text:
            raise ValueError("this training model has no recorded privacy policy")
        data = json.loads(text)
        raw = data.get("policy")
        return cls(
            policy=None if raw is None else DpPolicy.from_dict(raw), source=str(data.get("source", ""))
        )


def client_request(user_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extract the client's ``tensafe.dp.*`` requests from ``user_metadata``.

    Returns:
        Field changes for ``DpPolicy.tighten`` plus, possibly, ``enabled`` (bool).

    Raises:
        BadRequestError: An unknown ``tensafe.dp.*`` key or a malformed value.
    """
    out: dict[str, Any] = {}
    for key, raw in (user_metadata or {}).items():
        if not isinstance(key, str) or not key.startswith(CLIENT_PREFIX):
            continue
        name = key[len(CLIENT_PREFIX) :]
        text = str(raw).strip()
        try:
            if name in _FLOAT_FIELDS:
                value: Any = float(text)
                if not math.isfinite(value):
                    raise ValueError(text)
            elif name in _INT_FIELDS:
                value = int(text)
            elif name == "sampling":
                value = text
            elif name == "enabled":
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                value = text.lower() == "true"
            else:
                known = ", ".join(
                    CLIENT_PREFIX + n for n in (*_FLOAT_FIELDS, *_INT_FIELDS, "sampling", "enabled")
                )
                raise BadRequestError(f"unknown privacy request {key!r}; known keys: {known}")
        except ValueError:
            raise BadRequestError(f"user_metadata {key!r}={text!r} is not a valid value") from None
        out[name] = value
    return out


def tenant_row(session: Session, tenant: str) -> PrivacyPolicyRow | None:
    """Return the tenant's policy row, if the tenant has one."""
    return session.get(PrivacyPolicyRow, tenant)


def effective_policy(
    operator: OperatorPrivacy, row: PrivacyPolicyRow | None, request: Mapping[str, Any] | None = None
) -> EffectivePolicy:
    """Combine the operator's floor, the tenant's policy and the client's request.

    Raises:
        BadRequestError: The client asked for a looser policy, or for no DP where that is
            not allowed (the message names the fields).
    """
    from tensafe.privacy import DpPolicy, DpPolicyError

    base = operator.policy()
    source = "operator"
    allow_off = operator.allow_non_private
    try:
        if row is not None:
            tenant = DpPolicy(
                target_epsilon=row.target_epsilon,
                delta=row.delta,
                clip_norm=row.clip_norm,
                accountant=row.accountant,
                dataset_size=row.dataset_size if row.dataset_size is not None else base.dataset_size,
                expected_batch_size=(
                    row.expected_batch_size
                    if row.expected_batch_size is not None
                    else base.expected_batch_size
                ),
                max_steps=row.max_steps if row.max_steps is not None else base.max_steps,
                dataset_size_source="declared" if row.dataset_size is not None else "defaulted",
            )
            base = DpPolicy.stricter_of(base, tenant)
            source = "operator+tenant"
            allow_off = allow_off and row.allow_non_private
        else:
            allow_off = False
        changes = dict(request or {})
        enabled = changes.pop("enabled", True)
        if not enabled:
            if not allow_off:
                raise BadRequestError(
                    "this tenant's privacy policy does not allow training without differential "
                    "privacy; remove tensafe.dp.enabled=false"
                )
            return EffectivePolicy(policy=None, source=source + "+client")
        if "dataset_size" in changes:
            changes["dataset_size_source"] = "declared"
        if changes:
            base = base.tighten(**changes)
            source += "+client"
        if base.sampling == "server_poisson" and "dataset_size" not in changes:
            # N is the size of the data set the client registers, not a claim.
            base = dataclasses.replace(base, dataset_size=None)
    except DpPolicyError as exc:  # PolicyLoosenedError included
        raise BadRequestError(f"privacy policy: {exc}") from None
    return EffectivePolicy(policy=base, source=source)


def set_tenant_policy(
    session: Session,
    tenant: str,
    *,
    target_epsilon: float,
    delta: float,
    clip_norm: float,
    accountant: str = "rdp",
    allow_non_private: bool = False,
    dataset_size: int | None = None,
    expected_batch_size: int | None = None,
    max_steps: int | None = None,
) -> PrivacyPolicyRow:
    """Create or replace a tenant's privacy policy (validated as a DP policy).

    Raises:
        TenantAdminError: Unknown tenant, or values that do not form a valid policy.
    """
    from tensafe.db import Tenant
    from tensafe.privacy import DpPolicy, DpPolicyError

    if session.get(Tenant, tenant) is None:
        raise TenantAdminError(f"unknown tenant {tenant!r}; create it with 'tensafe admin create-tenant'")
    try:
        DpPolicy(
            target_epsilon=target_epsilon,
            delta=delta,
            clip_norm=clip_norm,
            accountant=accountant,
            dataset_size=dataset_size if dataset_size is not None else 10**9,
            expected_batch_size=expected_batch_size if expected_batch_size is not None else 1,
            max_steps=max_steps if max_steps is not None else 1,
        )
    except DpPolicyError as exc:
        raise TenantAdminError(f"invalid privacy policy: {exc}") from None
    row = session.get(PrivacyPolicyRow, tenant)
    if row is None:
        row = PrivacyPolicyRow(tenant_id=tenant)
        session.add(row)
    row.target_epsilon, row.delta, row.clip_norm, row.accountant = (
        float(target_epsilon),
        float(delta),
        float(clip_norm),
        accountant,
    )
    row.allow_non_private = bool(allow_non_private)
    row.dataset_size, row.expected_batch_size, row.max_steps = dataset_size, expected_batch_size, max_steps
    row.updated_at = utcnow()
    session.flush()
    return row


def model_privacy_spent(row: TrainingModel) -> dict[str, Any] | None:
    """The privacy spent by a training model after its last completed step (JSON-ready).

    Keys as in ``LoraTrainingSession.privacy_spent()``: ``dp_enabled``, ``epsilon``,
    ``target_epsilon``, ``delta``, ``noise_multiplier``, ``sample_rate``, ``steps`` ...
    None before the model was created.
    """
    if not row.privacy_spent:
        return None
    spent = json.loads(row.privacy_spent).get("spent")
    return dict(spent) if isinstance(spent, dict) else None


def model_certificate(row: TrainingModel) -> Any:
    """The :class:`tensafe.privacy.DpCertificate` of a training model after its last step.

    It is issued by the training runtime after every completed ``optim_step`` (ε computed
    by the accountant) and stored with the model. It states the sampling honestly:
    ``client_chosen_batches``, not performed by the engine, unless the run registered a data
    set and the engine drew its batches (``poisson``). None before the model was created.
    """
    from tensafe.privacy import DpCertificate

    if not row.privacy_spent:
        return None
    data = json.loads(row.privacy_spent).get("certificate")
    return None if data is None else DpCertificate.from_dict(data)
