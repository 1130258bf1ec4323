"""Contract every registered accountant must satisfy (style of dp_accounting's
``privacy_accountant_test.py``): one abstract suite, one subclass per accountant.

Values are kept small (few hundred steps) so the slow accountants stay fast.
"""

from __future__ import annotations

import itertools
import json
import pickle
from typing import ClassVar

import pytest

from tensafe.privacy import (
    Accountant,
    DpSgdEvent,
    PrivacyConfigError,
    SamplingMethod,
    UnsupportedEvent,
    UnsupportedEventError,
    available_accountants,
    create_accountant,
)
from tensafe.privacy.accountants import (
    MomentsAccountant,
    PldAccountant,
    PrvAccountant,
    RdpAccountant,
    get_accountant_class,
)

DELTA = 1e-5
EVENT = DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=200)


class AccountantContract:
    """Abstract suite; subclasses set ``name`` and ``cls``."""

    name: ClassVar[str]
    cls: ClassVar[type[Accountant]]
    # PRV's ε carries a discretisation error of up to eps_error (0.01) in absolute terms.
    slack: ClassVar[float] = 1e-9

    def make(self) -> Accountant:
        return create_accountant(self.name)

    def test_registered_under_its_name(self) -> None:
        assert self.name in available_accountants()
        assert get_accountant_class(self.name) is self.cls
        assert type(self.make()) is self.cls

    def test_empty_history_is_zero(self) -> None:
        acc = self.make()
        assert acc.steps == 0
        assert acc.get_epsilon(DELTA) == 0.0

    def test_supports_poisson_dp_sgd(self) -> None:
        assert self.make().supports(EVENT)

    @pytest.mark.parametrize("method", [SamplingMethod.SHUFFLED, SamplingMethod.CLIENT_CHOSEN_BATCHES])
    def test_refuses_non_poisson_by_name(self, method: SamplingMethod) -> None:
        acc = self.make()
        event = DpSgdEvent(noise_multiplier=1.0, sample_rate=0.01, steps=10, sampling_method=method)
        assert not acc.supports(event)
        with pytest.raises(UnsupportedEventError, match=rf"{self.name}.*'dp_sgd'.*{method.value}"):
            acc.compose(event)
        assert acc.history == ()

    def test_refuses_unsupported_event_by_name(self) -> None:
        acc = self.make().compose(EVENT)
        with pytest.raises(UnsupportedEventError, match="'unsupported'"):
            acc.compose(UnsupportedEvent(description="non-private evaluation on training data"))
        assert acc.history == (EVENT,)

    def test_refuses_foreign_objects(self) -> None:
        with pytest.raises(UnsupportedEventError, match=r"not a tensafe\.privacy DpEvent"):
            self.make().compose(("sigma", 1.0))  # type: ignore[arg-type]

    def test_compose_is_chainable_and_merges(self) -> None:
        acc = self.make()
        assert acc.compose(EVENT) is acc
        acc.compose(EVENT).compose(DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=0))
        assert acc.steps == 400
        assert acc.history == (DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=400),)

    def test_split_composition_equals_single(self) -> None:
        whole = self.make().compose(DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=300))
        parts = self.make()
        for steps in (100, 150, 50):
            parts.compose(DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=steps))
        assert parts.get_epsilon(DELTA) == whole.get_epsilon(DELTA)

    def test_monotone_in_steps(self) -> None:
        values = [
            self.make()
            .compose(DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=t))
            .get_epsilon(DELTA)
            for t in (1, 50, 200, 400)
        ]
        assert all(a <= b + self.slack for a, b in itertools.pairwise(values))
        assert values[-1] > values[0]

    def test_monotone_in_noise(self) -> None:
        values = [
            self.make()
            .compose(DpSgdEvent(noise_multiplier=s, sample_rate=0.02, steps=200))
            .get_epsilon(DELTA)
            for s in (0.8, 1.1, 2.0, 4.0)
        ]
        assert all(a >= b - self.slack for a, b in itertools.pairwise(values))
        assert values[0] > values[-1]

    def test_larger_delta_gives_smaller_epsilon(self) -> None:
        acc = self.make().compose(EVENT)
        assert acc.get_epsilon(1e-3) < acc.get_epsilon(1e-7)

    def test_heterogeneous_history_costs_more_than_each_part(self) -> None:
        other = DpSgdEvent(noise_multiplier=2.0, sample_rate=0.05, steps=100)
        both = self.make().compose(EVENT).compose(other)
        assert len(both.history) == 2
        eps = both.get_epsilon(DELTA)
        assert eps > self.make().compose(EVENT).get_epsilon(DELTA)
        assert eps > self.make().compose(other).get_epsilon(DELTA)

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, float("nan"), True])
    def test_rejects_bad_delta(self, delta: float) -> None:
        with pytest.raises(PrivacyConfigError, match="delta"):
            self.make().compose(EVENT).get_epsilon(delta)

    def test_state_dict_round_trip_through_json(self) -> None:
        acc = self.make().compose(EVENT).compose(DpSgdEvent(noise_multiplier=2.0, sample_rate=0.05, steps=7))
        state = json.loads(json.dumps(acc.state_dict()))
        fresh = self.make()
        fresh.load_state_dict(state)
        assert fresh.history == acc.history
        assert fresh.get_epsilon(DELTA) == acc.get_epsilon(DELTA)

    def test_state_dict_of_another_accountant_is_refused(self) -> None:
        other = next(n for n in available_accountants() if n != self.name)
        state = create_accountant(other).compose(EVENT).state_dict()
        with pytest.raises(PrivacyConfigError, match="saved by"):
            self.make().load_state_dict(state)

    def test_report_details_are_json_and_read_only(self) -> None:
        report = self.make().compose(EVENT).get_report(DELTA)
        assert report.accountant == self.name
        assert json.loads(json.dumps(report.to_dict()))["epsilon"] == report.epsilon
        with pytest.raises(TypeError):
            report.details["epsilon"] = 0.0  # type: ignore[index]

    def test_unsupported_error_pickles(self) -> None:
        with pytest.raises(UnsupportedEventError) as info:
            self.make().compose(UnsupportedEvent(description="x"))
        clone = pickle.loads(pickle.dumps(info.value))
        assert str(clone) == str(info.value)


class TestRdpAccountant(AccountantContract):
    name = "rdp"
    cls = RdpAccountant


class TestMomentsAccountant(AccountantContract):
    name = "moments"
    cls = MomentsAccountant

    def test_never_tighter_than_rdp(self) -> None:
        rdp = create_accountant("rdp").compose(EVENT).get_epsilon(DELTA)
        assert self.make().compose(EVENT).get_epsilon(DELTA) >= rdp


class TestPldAccountant(AccountantContract):
    name = "pld"
    cls = PldAccountant


class TestPrvAccountant(AccountantContract):
    name = "prv"
    cls = PrvAccountant
    slack = 0.02

    def test_reports_upper_bound_and_estimates(self) -> None:
        report = self.make().compose(EVENT).get_report(DELTA)
        d = report.details
        assert d["epsilon_lower"] <= d["epsilon_estimate"] <= d["epsilon_upper"] == report.epsilon
        # The library widens the interval by eps_error plus the effect of delta_error.
        assert d["epsilon_upper"] - d["epsilon_estimate"] <= 2 * d["eps_error"]


def test_every_registered_accountant_has_a_contract_subclass() -> None:
    covered = {c.name for c in AccountantContract.__subclasses__()}
    assert covered == set(available_accountants())
