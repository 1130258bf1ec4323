"""Name → accountant class registry (like ``opacus.accountants.registry``)."""

from __future__ import annotations

from tensafe.privacy.accountants.base import Accountant
from tensafe.privacy.accountants.builtin import MomentsAccountant, PldAccountant, PrvAccountant, RdpAccountant
from tensafe.privacy.errors import PrivacyConfigError

__all__ = [
    "DEFAULT_ACCOUNTANT",
    "available_accountants",
    "create_accountant",
    "get_accountant_class",
    "register_accountant",
]

#: The accountant used when none is named.
DEFAULT_ACCOUNTANT = "rdp"

_ACCOUNTANTS: dict[str, type[Accountant]] = {
    cls.name: cls for cls in (RdpAccountant, MomentsAccountant, PldAccountant, PrvAccountant)
}


def register_accountant(name: str, accountant: type[Accountant], *, force: bool = False) -> None:
    """Register ``accountant`` under ``name``.

    Raises:
        PrivacyConfigError: If ``name`` is taken (unless ``force``) or the class is not an
            :class:`~tensafe.privacy.accountants.base.Accountant` whose ``name`` is ``name``.
    """
    if not (isinstance(accountant, type) and issubclass(accountant, Accountant)):
        raise PrivacyConfigError(f"{accountant!r} is not an Accountant subclass")
    if getattr(accountant, "name", None) != name:
        raise PrivacyConfigError(
            f"accountant class {accountant.__name__} has name {accountant.name!r}, not {name!r}"
        )
    if name in _ACCOUNTANTS and not force:
        raise PrivacyConfigError(f"an accountant named {name!r} is already registered")
    _ACCOUNTANTS[name] = accountant


def available_accountants() -> tuple[str, ...]:
    """Return the registered names, sorted."""
    return tuple(sorted(_ACCOUNTANTS))


def get_accountant_class(name: str) -> type[Accountant]:
    """Return the class registered as ``name``.

    Raises:
        PrivacyConfigError: If no accountant has that name.
    """
    try:
        return _ACCOUNTANTS[name]
    except (KeyError, TypeError):
        raise PrivacyConfigError(
            f"unknown accountant {name!r}; choose one of: {', '.join(available_accountants())}"
        ) from None


def create_accountant(name: str) -> Accountant:
    """Return a new, empty accountant of the class registered as ``name``."""
    return get_accountant_class(name)()
