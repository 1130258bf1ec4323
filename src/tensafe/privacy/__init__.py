"""Differential-privacy accounting for TenSafe's DP-SGD engine.

Public surface (everything that affects privacy takes keyword-only arguments):

* :func:`compute_epsilon`, :func:`epsilon_report` and :func:`calibrate_noise` for one-shot
  questions ("what ε does this spend?", "how much noise for this ε?").
* :class:`PrivacyBudget`, the per-run stateful budget the trainer consults every step.
* :class:`DpCertificate`, the versioned ``dp_certificate.json`` a run produces.
* :class:`DpPolicy`, the DP-SGD policy the platform enforces (operator, tenant, client), and
  :func:`plan_dp_sgd`, which turns a policy and a data set size into a run's σ, q and budget
  (:class:`DpPlan`) for both ``tensafe train`` and the training server.
* Immutable spending records (:class:`DpSgdEvent`, :class:`UnsupportedEvent`) and the
  accountant registry (:func:`create_accountant`, :func:`available_accountants`,
  :func:`register_accountant`) for heterogeneous histories.
* :func:`validate_delta` and the error tree rooted at :class:`PrivacyError`.

The accountants (``rdp``, ``moments``, ``pld``, ``prv``) delegate all analysis to
``dp_accounting`` and ``prv_accountant``; see ``docs/privacy.md``. This package never
imports torch.
"""

from __future__ import annotations

from tensafe.privacy._validation import validate_delta
from tensafe.privacy.accountants import (
    DEFAULT_ACCOUNTANT,
    Accountant,
    EpsilonReport,
    available_accountants,
    create_accountant,
    register_accountant,
)
from tensafe.privacy.budget import PrivacyBudget
from tensafe.privacy.calibration import calibrate_noise, compute_epsilon, epsilon_report
from tensafe.privacy.certificate import CERTIFICATE_FILENAME, CERTIFICATE_SCHEMA, DpCertificate
from tensafe.privacy.errors import (
    BudgetExceededError,
    CertificateError,
    DpPolicyError,
    PolicyLoosenedError,
    PrivacyConfigError,
    PrivacyError,
    UnreachableBudgetError,
    UnsupportedEventError,
)
from tensafe.privacy.events import DpEvent, DpSgdEvent, SamplingMethod, UnsupportedEvent
from tensafe.privacy.plan import DpPlan, NoiseOrigin, plan_dp_sgd
from tensafe.privacy.policy import SAMPLING_MODES, DpPolicy, SamplingMode

__all__ = [
    "CERTIFICATE_FILENAME",
    "CERTIFICATE_SCHEMA",
    "DEFAULT_ACCOUNTANT",
    "SAMPLING_MODES",
    "Accountant",
    "BudgetExceededError",
    "CertificateError",
    "DpCertificate",
    "DpEvent",
    "DpPlan",
    "DpPolicy",
    "DpPolicyError",
    "DpSgdEvent",
    "EpsilonReport",
    "NoiseOrigin",
    "PolicyLoosenedError",
    "PrivacyBudget",
    "PrivacyConfigError",
    "PrivacyError",
    "SamplingMethod",
    "SamplingMode",
    "UnreachableBudgetError",
    "UnsupportedEvent",
    "UnsupportedEventError",
    "available_accountants",
    "calibrate_noise",
    "compute_epsilon",
    "create_accountant",
    "epsilon_report",
    "plan_dp_sgd",
    "register_accountant",
    "validate_delta",
]
