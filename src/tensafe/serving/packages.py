"""Verified TSSP packages as an adapter source (``tensafe serve``).

A package reaches an engine only through :class:`PackageAdmission.admit`, which runs every
check of :func:`tensafe.package.unpack` (format, signatures against the operator's trust
store and threshold, expiry, rollback, the Rego admission policy), decrypts the payload **in
memory** with the serving recipient key (:func:`tensafe.package.unpack_to_memory`; no
plaintext byte is written to a file), and then checks that the adapter is for the served
base model: the manifest's ``base_model.id`` must be the engine's model name and, when the
manifest pins ``base_model.sha256``, the served weights must have that hash. Each decision
goes to the tenant's audit chain (the TSSP ``tssp.unpack.*`` events; the registry adds the
``serving.adapter.*`` ones).

:class:`PackageSource` is the :class:`~tensafe.serving.registry.AdapterSource` of the
admitted packages of one tenant. A package is served under its manifest name (``clinical``)
and under ``name@version`` (``clinical@1.0.0``); one version per name (loading another
version of a name replaces it). A package is served only until its manifest's ``expires``:
after that, :meth:`PackageSource.check` makes the registry's sweep unload it and a request
for it is answered 404 with a message saying it expired (only the serving tenant can
authenticate, so the message tells nothing to anyone else). A package the operator removed
(``DELETE /admin/adapters/{name}``) is unknown from then on.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridVerifyingKey
from tensafe.db import utcnow
from tensafe.package import (
    POLICY_PACKAGE,
    AuditSink,
    PackageError,
    PackageInfo,
    RollbackState,
    unpack_to_memory,
)
from tensafe.policy import Policy, PolicyError
from tensafe.serving.engine import LoraAdapter
from tensafe.serving.errors import AdapterRefusedError, AdapterUnavailableError
from tensafe.serving.registry import AdapterRef, ModelEntry, ServingCaller, model_not_found

__all__ = ["PACKAGE_SOURCE", "AdmittedPackage", "PackageAdmission", "PackageSource", "RevocationList"]

#: The :attr:`PackageSource.name` (part of every package adapter's engine id).
PACKAGE_SOURCE = "package"

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True, kw_only=True)
class AdmittedPackage:
    """A verified package and its decrypted adapter files (in memory only).

    Attributes:
        name: The manifest name (the model name clients use).
        version: The manifest version (``name@version`` is the other model name).
        expires: The manifest's expiry (UTC); the package is not served from then on.
        header_sha256: The package's header digest (its identity; part of the engine id).
        source: Where it was read from (a path, or ``upload``), for messages and listings.
        info: The verified package description.
        files: ``adapter_config.json`` and ``adapter_model.safetensors`` as bytes.
    """

    name: str
    version: str
    expires: _dt.datetime
    header_sha256: str
    source: str
    info: PackageInfo
    files: Mapping[str, bytes]

    @property
    def model(self) -> str:
        """The versioned model name, ``name@version``."""
        return f"{self.name}@{self.version}"

    def __repr__(self) -> str:  # never the weights
        return f"AdmittedPackage({self.model!r}, header_sha256={self.header_sha256[:16]}...)"


class PackageAdmission:
    """The operator's admission rules: trust store, recipient key, policy, rollback state.

    Args:
        trust: The signer public keys the operator trusts (``--trust``); at least one.
        recipient_key: The serving process's hybrid KEM private key (``--recipient-key``).
        policy: The source text of a Rego admission policy in ``package tensafe.tssp``, or
            None. It is compiled here (a bad policy fails at once) and again for each
            admission in the admitting thread: the Rego engine may not cross threads.
        policy_origin: A name for the policy in messages (its file name).
        threshold: Minimum number of distinct trusted signers (the manifest's also applies).
        state: The TSSP rollback state, or None to skip rollback protection.
        audit: Receives the ``tssp.unpack.*`` event of every decision (fail closed).
        base_model: The served base model's name; every package must name it.
        base_model_sha256: The served weights' hash (:attr:`ModelSpec.revision`), compared
            with a manifest that pins one; None when the weights have no known hash.
    """

    def __init__(
        self,
        *,
        trust: Sequence[HybridVerifyingKey],
        recipient_key: HybridKemPrivateKey,
        policy: str | None,
        policy_origin: str = "<policy>",
        threshold: int = 1,
        state: RollbackState | None,
        audit: AuditSink | None,
        base_model: str,
        base_model_sha256: str | None,
    ) -> None:
        """Keep the rules; nothing is checked until :meth:`admit`."""
        if not trust:
            raise AdapterRefusedError("give at least one trusted signer public key (--trust SIGNER.pub)")
        self._trust = tuple(trust)
        self._recipient_key = recipient_key
        self._policy = policy
        self._policy_origin = policy_origin
        if policy is not None:
            self._compile_policy()
        self._threshold = threshold
        self._state = state
        self._audit = audit
        self.base_model = base_model
        self._base_model_sha256 = base_model_sha256

    def __repr__(self) -> str:
        return f"PackageAdmission(base_model={self.base_model!r}, trusted={len(self._trust)})"

    def _compile_policy(self) -> Policy | None:
        if self._policy is None:
            return None
        try:
            return Policy.from_text(self._policy, package=POLICY_PACKAGE, origin=self._policy_origin)
        except PolicyError as exc:
            raise AdapterRefusedError(
                f"the admission policy {self._policy_origin} is not usable: {exc}"
            ) from None

    def admit(
        self, package: str | Path, *, now: _dt.datetime | None = None, audit: AuditSink | None = None
    ) -> AdmittedPackage:
        """Verify, decrypt in memory and check one package.

        ``audit`` replaces the admission's audit sink for this decision (an operator's load
        at runtime is recorded under the operator as actor).

        Raises:
            AdapterRefusedError: One line naming the package and the first check that failed
                (tampered, expired, untrusted signer, not a recipient, rollback, policy
                denial, wrong base model, not a LoRA adapter); its ``exit_code`` is the
                TSSP error's when the package layer refused it.
        """
        where = str(package)
        policy = self._compile_policy()
        refused: AdapterRefusedError | None = None
        try:
            info, files = unpack_to_memory(
                package,
                recipient_key=self._recipient_key,
                trust=self._trust,
                state=self._state,
                policy=policy,
                threshold=self._threshold,
                now=now,
                audit=audit if audit is not None else self._audit,
            )
        except PackageError as exc:
            refused = AdapterRefusedError(f"package {where} refused: {exc}")
            refused.exit_code = exc.exit_code
            # The traceback's frames hold the policy: free them here, in this thread (a Rego
            # engine dropped by the garbage collector in another thread is an error).
            exc.__traceback__ = None
        finally:
            del policy
        if refused is not None:
            raise refused
        self._check_base_model(where, info)
        adapter_files = _adapter_files(where, info, files)
        del files
        return AdmittedPackage(
            name=info.name,
            version=info.version,
            expires=info.expires,
            header_sha256=info.header_sha256,
            source=where,
            info=info,
            files=adapter_files,
        )

    def _check_base_model(self, where: str, info: PackageInfo) -> None:
        if info.base_model_id != self.base_model:
            raise AdapterRefusedError(
                f"package {where} refused: its adapter is for base model {info.base_model_id!r}, "
                f"but this server serves {self.base_model!r}"
            )
        pinned = info.base_model_sha256
        if pinned is not None and pinned != self._base_model_sha256:
            served = self._base_model_sha256 or "unknown"
            raise AdapterRefusedError(
                f"package {where} refused: it pins base model weights sha256 {pinned[:16]}..., "
                f"but the served weights of {self.base_model!r} are {served[:16]}..."
            )


def _adapter_files(where: str, info: PackageInfo, files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The PEFT LoRA files of a verified package (the engine checks shapes when it loads them)."""
    missing = [name for name in _ADAPTER_FILES if name not in files]
    if missing:
        raise AdapterRefusedError(
            f"package {where} refused: it holds no PEFT LoRA adapter (missing {', '.join(missing)})"
        )
    try:
        config = json.loads(files["adapter_config.json"])
    except ValueError:
        raise AdapterRefusedError(f"package {where} refused: adapter_config.json is not JSON") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterRefusedError(f"package {where} refused: adapter_config.json is not a LoRA adapter's")
    return {name: files[name] for name in _ADAPTER_FILES}


@dataclass(frozen=True)
class RevocationList:
    """What the operator withdrew before expiry: package header digests and signer key ids.

    The file format (``tensafe serve --revocation-list FILE``) is text, one entry per line:
    ``package:<64 hex digits>`` (a package's header SHA-256, ``tensafe tssp inspect``) or
    ``signer:<32 hex digits>`` (a signer key id: every package it signed is withdrawn, even one
    other trusted signers also signed); blank lines and ``#`` comments are ignored.
    """

    packages: frozenset[str] = frozenset()
    signers: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str, *, origin: str = "<revocation list>") -> RevocationList:
        """Parse the file format above.

        Raises:
            AdapterRefusedError: A line is not an entry (its number is named).
        """
        packages: set[str] = set()
        signers: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, value = line.partition(":")
            value = value.strip().lower()
            if kind == "package" and _is_hex(value, 64):
                packages.add(value)
            elif kind == "signer" and _is_hex(value, 32):
                signers.add(value)
            else:
                raise AdapterRefusedError(
                    f"{origin} line {number}: expected 'package:<64 hex digits>' or 'signer:<32 hex digits>'"
                )
        return cls(packages=frozenset(packages), signers=frozenset(signers))

    def reason(self, package: AdmittedPackage | PackageInfo) -> str | None:
        """Why ``package`` is revoked, or None."""
        if package.header_sha256 in self.packages:
            return "its package was revoked"
        info = package.info if isinstance(package, AdmittedPackage) else package
        revoked = sorted(set(info.trusted_signers) & self.signers)
        if revoked:
            return f"its signer {revoked[0]} was revoked"
        return None


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


@dataclass
class _Entry:
    package: AdmittedPackage
    ref: AdapterRef


class PackageSource:
    """The admitted packages of one tenant, as an adapter source (see the module docstring).

    Args:
        tenant: The tenant whose API keys may use the packages (and whose chain records them).
        base_model: The served base model's name.
        clock: The current UTC time (tests drive it).
    """

    def __init__(self, *, tenant: str, base_model: str, clock: Callable[[], _dt.datetime] = utcnow) -> None:
        """Start empty; :meth:`add` admitted packages."""
        self.tenant = tenant
        self.base_model = base_model
        self._clock = clock
        self._revoked = RevocationList()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PackageSource(tenant={self.tenant!r}, packages={sorted(self._entries)})"

    @property
    def name(self) -> str:
        """``package``."""
        return PACKAGE_SOURCE

    # ------------------------------------------------------------------ the operator's side

    def add(self, package: AdmittedPackage) -> AdmittedPackage | None:
        """Serve ``package`` under its name; returns the package of that name it replaces."""
        ref = AdapterRef(
            source=PACKAGE_SOURCE,
            name=package.model,
            tenant=self.tenant,
            base_model=self.base_model,
            version=package.header_sha256,
            locator=package.name,
        )
        with self._lock:
            old = self._entries.get(package.name)
            self._entries[package.name] = _Entry(package=package, ref=ref)
        return None if old is None else old.package

    def remove(self, name: str) -> AdmittedPackage | None:
        """Stop serving the package ``name`` (or ``name@version``); returns it, or None if unknown."""
        with self._lock:
            entry = self._find(name)
            if entry is None:
                return None
            del self._entries[entry.package.name]
        return entry.package

    def packages(self) -> list[AdmittedPackage]:
        """Every package held, expired ones included, by name."""
        with self._lock:
            return [self._entries[n].package for n in sorted(self._entries)]

    def ref_of(self, name: str) -> AdapterRef | None:
        """The adapter reference of ``name`` / ``name@version`` (None if unknown)."""
        with self._lock:
            entry = self._find(name)
        return None if entry is None else entry.ref

    def set_revoked(self, revoked: RevocationList) -> None:
        """Withdraw what ``revoked`` names (requests are refused at once; the sweep unloads)."""
        self._revoked = revoked

    # ------------------------------------------------------------------ AdapterSource

    def resolve(self, caller: ServingCaller, model: str) -> AdapterRef | None:
        """The package ``model`` names (``name`` or ``name@version``) for the serving tenant.

        Raises:
            AdapterUnavailableError: The package expired (the message says when).
            ModelNotFoundError: Another tenant asks (it cannot authenticate here anyway).
        """
        with self._lock:
            entry = self._find(model)
        if entry is None:
            return None
        if caller.tenant != self.tenant:
            raise model_not_found(model)
        self._check_usable(entry.package)
        return entry.ref

    def fetch(self, ref: AdapterRef) -> LoraAdapter:
        """The package's decrypted adapter files (from memory)."""
        package = self._current(ref)
        return LoraAdapter(adapter_id=ref.adapter_id, base_model_id=self.base_model, files=package.files)

    def check(self, ref: AdapterRef) -> None:
        """Raise if ``ref`` may no longer be served (expired, removed or replaced)."""
        self._current(ref)

    def list_models(self, caller: ServingCaller) -> Sequence[ModelEntry]:
        """The unexpired packages, each as ``name`` and ``name@version``."""
        if caller.tenant != self.tenant:
            return []
        now = self._clock()
        out: list[ModelEntry] = []
        for package in self.packages():
            if now < package.expires and self._revoked.reason(package) is None:
                created = int(package.info.created.timestamp())
                for model in (package.name, package.model):
                    out.append(
                        ModelEntry(id=model, owned_by=self.tenant, root=self.base_model, created=created)
                    )
        return out

    # ------------------------------------------------------------------ internals

    def _find(self, model: str) -> _Entry | None:
        name, _, version = model.partition("@")
        entry = self._entries.get(name)
        if entry is None or (version and version != entry.package.version):
            return None
        return entry

    def _current(self, ref: AdapterRef) -> AdmittedPackage:
        with self._lock:
            entry = self._entries.get(ref.locator)
        if entry is None or entry.ref.adapter_id != ref.adapter_id:
            raise model_not_found(ref.name)
        self._check_usable(entry.package)
        return entry.package

    def _check_usable(self, package: AdmittedPackage) -> None:
        why = self._revoked.reason(package)
        if why is not None:
            raise AdapterUnavailableError(
                f"The model `{package.model}` is no longer served: {why} (the operator's revocation list)."
            )
        if self._clock() >= package.expires:
            raise AdapterUnavailableError(
                f"The model `{package.model}` is no longer served: its package expired at "
                f"{package.expires.strftime('%Y-%m-%dT%H:%M:%SZ')}; ask its publisher for a new version."
            )
