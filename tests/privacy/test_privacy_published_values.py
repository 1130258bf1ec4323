"""Published ε values, reproduced within 0.1 %, plus independent oracles.

Provenance of every pinned number:

* Opacus ``tests/accountants_test.py`` (pytorch/opacus, v1.x): ``test_rdp_accountant``
  (σ=1.5, q=0.04, 2250 steps, δ=1e-5: ε=7.32911117143) and ``test_prv_accountant``
  (same, ``int(90 // 0.04)`` = 2249 steps: ε=6.777395712150674).
* TF Privacy ``tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py``:
  since 2020 (tight RDP conversion) Test0 N=60000, B=150, σ=1.3, 15 epochs, δ=1e-5:
  ε=0.7242234026109595 at order 19; Test1 N=100000, B=100, σ=1.0, 30 epochs, δ=1e-7:
  ε=1.4154988495444845 at order 13. Before 2020 (classic conversion of the moments
  accountant) the same cases read 0.941870567 (order 19) and 1.70928734 (order 13).
  Their Test2 (σ=0.1) is not used: TF Privacy evaluated it on another α grid.
* ``shared/reference/stack.md`` (measured on this machine kind): q=0.01, σ=1, 1000
  steps, δ=1e-5: RDP 2.1014, PLD 1.8282, PRV [1.8182, 1.8282, 1.8382].
"""

from __future__ import annotations

import math

import pytest

from tensafe.privacy import compute_epsilon, epsilon_report

REL = 1e-3  # 0.1 %


def _tf_case(n: int, batch: int, epochs: int) -> tuple[float, int]:
    # compute_dp_sgd_privacy: q = B/N, steps = ceil(epochs * N / B).
    return batch / n, math.ceil(epochs * n / batch)


def test_opacus_rdp_published() -> None:
    eps = compute_epsilon(accountant="rdp", noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5)
    assert eps == pytest.approx(7.32911117143, rel=REL)


@pytest.mark.slow
def test_opacus_prv_published() -> None:
    report = epsilon_report(accountant="prv", noise_multiplier=1.5, sample_rate=0.04, steps=2249, delta=1e-5)
    assert report.epsilon == pytest.approx(6.777395712150674, rel=REL)
    assert report.details["epsilon_upper"] == report.epsilon
    assert report.details["epsilon_lower"] < report.details["epsilon_estimate"] < report.epsilon


@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta", "eps", "order"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 19.0),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444845, 13.0),
    ],
)
def test_tf_privacy_current_rdp(
    n: int, batch: int, sigma: float, epochs: int, delta: float, eps: float, order: float
) -> None:
    q, steps = _tf_case(n, batch, epochs)
    report = epsilon_report(accountant="rdp", noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert report.epsilon == pytest.approx(eps, rel=REL)
    assert report.details["optimal_order"] == order


@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta", "eps", "order"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.941870567, 19.0),
        (100000, 100, 1.0, 30, 1e-7, 1.70928734, 13.0),
    ],
)
def test_tf_privacy_legacy_moments(
    n: int, batch: int, sigma: float, epochs: int, delta: float, eps: float, order: float
) -> None:
    q, steps = _tf_case(n, batch, epochs)
    report = epsilon_report(
        accountant="moments", noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta
    )
    assert report.epsilon == pytest.approx(eps, rel=REL)
    assert report.details["optimal_order"] == order


def test_stack_reference_rdp_and_pld() -> None:
    kw = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1000, "delta": 1e-5}
    assert compute_epsilon(accountant="rdp", **kw) == pytest.approx(2.1014, rel=REL)
    assert compute_epsilon(accountant="pld", **kw) == pytest.approx(1.8282, rel=REL)


def test_stack_reference_prv_bounds() -> None:
    report = epsilon_report(accountant="prv", noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert report.details["epsilon_lower"] == pytest.approx(1.8182, rel=REL)
    assert report.details["epsilon_estimate"] == pytest.approx(1.8282, rel=REL)
    assert report.epsilon == pytest.approx(1.8382, rel=REL)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(0.8, 0.01, 500), (1.0, 0.004, 3000), (2.0, 0.05, 800), (4.0, 0.2, 100)],
)
def test_rdp_matches_opacus_oracle(sigma: float, q: float, steps: int) -> None:
    """Opacus' own RDP analysis (opacus.accountants.analysis.rdp) is an independent implementation."""
    accountants = pytest.importorskip("opacus.accountants")
    oracle = accountants.RDPAccountant()
    oracle.history = [(sigma, q, steps)]
    expected = oracle.get_epsilon(delta=1e-5)
    eps = compute_epsilon(accountant="rdp", noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert eps == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 300), (2.0, 0.05, 200)])
def test_prv_matches_opacus_oracle(sigma: float, q: float, steps: int) -> None:
    """Opacus re-implements the PRV accountant; its upper bound must agree with ours."""
    accountants = pytest.importorskip("opacus.accountants")
    oracle = accountants.PRVAccountant()
    oracle.history = [(sigma, q, steps)]
    expected = oracle.get_epsilon(delta=1e-5)
    eps = compute_epsilon(accountant="prv", noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert eps == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (1.5, 0.04, 500), (0.9, 0.002, 2000)])
def test_pld_and_prv_agree(sigma: float, q: float, steps: int) -> None:
    """Two different numerical methods (PLD in dp_accounting, PRV in prv_accountant) bracket ε.

    The PRV accountant proves the true ε lies in [lower, upper]; PLD's pessimistic
    estimate must land there, and both sit below the RDP bound.
    """
    kw = {"noise_multiplier": sigma, "sample_rate": q, "steps": steps, "delta": 1e-5}
    prv = epsilon_report(accountant="prv", **kw)
    pld = compute_epsilon(accountant="pld", **kw)
    assert prv.details["epsilon_lower"] - 1e-3 <= pld <= prv.epsilon + 1e-3
    assert prv.epsilon <= compute_epsilon(accountant="rdp", **kw)
