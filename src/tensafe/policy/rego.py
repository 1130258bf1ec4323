"""Rego policy evaluation with ``regorus`` (a Rust implementation of OPA's Rego).

A TenSafe policy is a Rego v1 module in a fixed package that defines a *deny set*::

    package tensafe.tssp
    import rego.v1

    deny contains msg if {
        input.dp_certificate.epsilon > 8
        msg := sprintf("epsilon %v exceeds 8", [input.dp_certificate.epsilon])
    }

Evaluation returns every deny message; an empty tuple means the input is allowed. A module that
does not define ``deny`` in the expected package, a ``deny`` that is not a set of strings, and any
evaluation error (e.g. division by zero) raise :class:`~tensafe.policy.PolicyEvaluationError`:
policies fail closed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensafe.policy.errors import PolicyEvaluationError, PolicyLoadError

__all__ = ["MAX_POLICY_BYTES", "Policy"]

#: Largest policy source accepted, in bytes.
MAX_POLICY_BYTES = 1 << 20

_PACKAGE_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


def _engine_message(exc: BaseException) -> str:
    """Return the useful part of a regorus error: one line, without the Rust backtrace."""
    text = str(exc).split("Stack backtrace", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    where = [line for line in lines if line.startswith("-->")]
    parts = []
    if where:
        parts.append(where[0][3:].strip())
    parts.append(errors[0][6:].strip() if errors else (lines[0] if lines else type(exc).__name__))
    return ": ".join(parts)


def _load_regorus() -> Any:
    try:
        import regorus
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise PolicyLoadError(
            "Rego policies need the 'regorus' module: pip install 'tensafe[policy]'"
        ) from exc
    return regorus


class Policy:
    """A compiled Rego policy with a deny-set decision rule.

    Build one with :meth:`from_file` or :meth:`from_text`; both check the syntax and that the
    module declares the expected package at load time.
    """

    __slots__ = ("_engine", "_origin", "_package")

    def __init__(self, *, engine: Any, package: str, origin: str) -> None:
        self._engine = engine
        self._package = package
        self._origin = origin

    def __repr__(self) -> str:
        return f"Policy(package={self._package!r}, origin={self._origin!r})"

    @property
    def package(self) -> str:
        """The Rego package whose ``deny`` set is evaluated."""
        return self._package

    @property
    def origin(self) -> str:
        """Where the policy came from (a path or a caller-given name)."""
        return self._origin

    @classmethod
    def from_text(cls, text: str, *, package: str, origin: str = "<policy>") -> Policy:
        """Compile a policy from Rego source.

        Args:
            text: The Rego v1 module.
            package: The package that must define ``deny`` (for example ``tensafe.tssp``).
            origin: A name for messages (a file name).

        Raises:
            PolicyLoadError: The source is too large, not valid Rego, or not in ``package``.
        """
        if not _PACKAGE_RE.fullmatch(package):
            raise PolicyLoadError(f"invalid Rego package name {package!r}")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise PolicyLoadError(f"policy {origin} is larger than {MAX_POLICY_BYTES} bytes")
        regorus = _load_regorus()
        engine = regorus.Engine()
        try:
            engine.add_policy(origin, text)
        except Exception as exc:  # regorus raises RuntimeError for every parse error
            raise PolicyLoadError(f"policy {origin} is not valid Rego: {_engine_message(exc)}") from None
        try:
            packages = set(engine.get_packages())
        except Exception as exc:  # pragma: no cover - defensive
            raise PolicyLoadError(f"policy {origin}: {_engine_message(exc)}") from None
        if f"data.{package}" not in packages:
            found = ", ".join(sorted(p.removeprefix("data.") for p in packages)) or "none"
            raise PolicyLoadError(f"policy {origin} must declare 'package {package}' (found package {found})")
        return cls(engine=engine, package=package, origin=origin)

    @classmethod
    def from_file(cls, path: str | Path, *, package: str) -> Policy:
        """Compile a policy from a ``.rego`` file.

        Raises:
            PolicyLoadError: The file cannot be read or is not a valid policy.
        """
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise PolicyLoadError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyLoadError(f"policy {path} is larger than {MAX_POLICY_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyLoadError(f"policy file {path} is not UTF-8 text") from None
        return cls.from_text(text, package=package, origin=str(path))

    def deny_reasons(self, input_document: Mapping[str, Any]) -> tuple[str, ...]:
        """Evaluate ``data.<package>.deny`` on ``input_document``.

        Args:
            input_document: A JSON-serialisable mapping, available to Rego as ``input``.

        Returns:
            The deny messages, sorted; empty when the input is allowed.

        Raises:
            PolicyEvaluationError: ``deny`` is undefined or not a set of strings, or evaluation failed.
        """
        try:
            input_json = json.dumps(input_document, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise PolicyEvaluationError(f"policy input is not JSON-serialisable: {exc}") from None
        rule = f"data.{self._package}.deny"
        engine = self._engine.clone()
        try:
            engine.set_input_json(input_json)
            result = engine.eval_rule(rule)
        except Exception as exc:
            message = _engine_message(exc)
            if "not a valid rule path" in message:
                raise PolicyEvaluationError(
                    f"policy {self._origin} defines no rule '{rule}'; a policy must define "
                    "'deny contains msg if {{...}}' (it fails closed)"
                ) from None
            raise PolicyEvaluationError(f"policy {self._origin} failed to evaluate: {message}") from None
        if result is None:
            raise PolicyEvaluationError(f"policy {self._origin}: '{rule}' is undefined (fails closed)")
        if not isinstance(result, (set, frozenset, list)):
            raise PolicyEvaluationError(
                f"policy {self._origin}: '{rule}' must be a set of strings, got {type(result).__name__}"
            )
        reasons: list[str] = []
        for item in result:
            if not isinstance(item, str):
                raise PolicyEvaluationError(
                    f"policy {self._origin}: '{rule}' must contain only strings, got {item!r:.80}"
                )
            reasons.append(item)
        return tuple(sorted(reasons))
