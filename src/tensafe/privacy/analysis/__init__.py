"""Pure privacy maths for Poisson-subsampled Gaussian DP-SGD, delegated to libraries.

Nothing here holds state or validates user input; the stateful accountants in
:mod:`tensafe.privacy.accountants` do that. Each function takes a sequence of
``(noise_multiplier, sample_rate, steps)`` compositions and a δ, and calls a
maintained library for the analysis:

* :mod:`~tensafe.privacy.analysis.rdp`: Rényi DP curves from ``dp_accounting`` 0.6
  (Mironov et al. 2019 for the subsampled Gaussian), converted to (ε, δ) by either the
  tight conversion in ``dp_accounting.rdp.compute_epsilon`` or the classic one of
  Abadi et al. 2016 / Mironov 2017.
* :mod:`~tensafe.privacy.analysis.pld`: privacy loss distributions from
  ``dp_accounting.pld`` (Koskela et al.; Doroshenko et al. 2022).
* :mod:`~tensafe.privacy.analysis.prv`: privacy random variables from
  ``prv_accountant`` 0.2 (Gopi, Lee and Wutschitz 2021).
"""

from __future__ import annotations

__all__ = ["Composition"]

#: ``(noise_multiplier, sample_rate, steps)`` of one run of identical DP-SGD steps.
Composition = tuple[float, float, int]
