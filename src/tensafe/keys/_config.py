"""Key-management configuration from the environment, with production checks.

Every variable is documented in ``docs/security/keys.md``. Production
(``TS_ENVIRONMENT=production``) refuses missing or weak settings with a
:class:`KeyConfigurationError` saying what to set; development creates what is missing
under ``TS_DATA_DIR`` and logs a loud warning.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tensafe import config
from tensafe.crypto.kdf import Argon2idParams
from tensafe.keys._local import LocalKekProvider
from tensafe.keys._provider import KekProvider
from tensafe.keys._vault import is_loopback_host
from tensafe.keys.errors import KeyConfigurationError, KeyNotFoundError

__all__ = [
    "AUDIT_CHECKPOINT_EVERY_ENV",
    "DEFAULT_AUDIT_CHECKPOINT_EVERY",
    "ENVIRONMENTS",
    "KeySettings",
    "check_passphrase",
    "open_provider",
]

_log = logging.getLogger("tensafe.keys")

ENVIRONMENTS = config.ENVIRONMENTS
PROVIDERS = ("local", "vault", "pkcs11")
MIN_PASSPHRASE_CHARS = 16
#: Minimum estimated entropy of ``TS_KEY_MASTER`` (length x empirical Shannon entropy).
MIN_PASSPHRASE_BITS = 50.0
_TRUE = {"1", "true", "yes", "on"}
#: The deployment's audit checkpoint interval (shared with tensafe.audit and the server).
AUDIT_CHECKPOINT_EVERY_ENV = "TS_AUDIT_CHECKPOINT_EVERY"
DEFAULT_AUDIT_CHECKPOINT_EVERY = config.DEFAULT_AUDIT_CHECKPOINT_EVERY


def check_passphrase(passphrase: str) -> None:
    """Refuse a passphrase that is short or has low estimated entropy.

    The estimate is the passphrase length times the empirical Shannon entropy of its
    characters; it catches repetition (``aaaa...``, ``passwordpassword``) but is not a
    guarantee of strength: use a generated passphrase (``openssl rand -base64 32``).

    Raises:
        KeyConfigurationError: The passphrase is too short or too predictable.
    """
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise KeyConfigurationError(
            f"TS_KEY_MASTER is shorter than {MIN_PASSPHRASE_CHARS} characters; "
            "use a generated passphrase such as the output of 'openssl rand -base64 32'"
        )
    counts = Counter(passphrase)
    n = len(passphrase)
    bits = -n * sum((c / n) * math.log2(c / n) for c in counts.values())
    if len(counts) < 8 or bits < MIN_PASSPHRASE_BITS:
        raise KeyConfigurationError(
            "TS_KEY_MASTER has too little entropy (too few distinct or too repetitive characters); "
            "use a generated passphrase such as the output of 'openssl rand -base64 32'"
        )


@dataclass(frozen=True)
class KeySettings:
    """Key-management settings read from the environment (no secrets in ``repr``)."""

    environment: str
    provider: str
    data_dir: Path
    env: Mapping[str, str]

    def __repr__(self) -> str:
        return (
            f"KeySettings(environment={self.environment!r}, provider={self.provider!r}, "
            f"data_dir={self.data_dir!r})"
        )

    @property
    def production(self) -> bool:
        """Whether production checks apply."""
        return self.environment == "production"

    def get(self, *names: str) -> str:
        """First non-empty value among ``names``, or ``""``."""
        for name in names:
            value = self.env.get(name, "").strip()
            if value:
                return value
        return ""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> KeySettings:
        """Read and validate the settings.

        Raises:
            KeyConfigurationError: Unknown environment or provider, or (in production)
                no provider, the local provider, or an insecure provider setting.
        """
        env = config.environ() if env is None else dict(env)
        try:
            environment = config.environment(env)  # the shared parsers (tensafe.config)
        except config.EnvironmentVariableError as exc:
            raise KeyConfigurationError(str(exc)) from None
        provider = env.get("TS_KEK_PROVIDER", "").strip().lower()
        if not provider:
            if environment == "production":
                raise KeyConfigurationError(
                    "no KEK provider configured: set TS_KEK_PROVIDER to 'vault' or 'pkcs11' in production"
                )
            provider = "local"
        if provider not in PROVIDERS:
            raise KeyConfigurationError(
                f"TS_KEK_PROVIDER must be one of {', '.join(PROVIDERS)}, not {provider!r}"
            )
        data_dir = config.data_dir(env)
        settings = cls(environment=environment, provider=provider, data_dir=data_dir, env=env)
        settings._check()
        return settings

    @property
    def audit_checkpoint_every(self) -> int:
        """``TS_AUDIT_CHECKPOINT_EVERY``: records between signed audit checkpoints (default 1000).

        Raises:
            KeyConfigurationError: The value is set but is not a positive integer.
        """
        try:
            return config.audit_checkpoint_every(self.env)
        except config.EnvironmentVariableError as exc:
            raise KeyConfigurationError(str(exc)) from None

    def _check(self) -> None:
        self.audit_checkpoint_every  # noqa: B018 - validates the variable early
        if self.env.get("TS_KEY_MASTER"):
            check_passphrase(self.env["TS_KEY_MASTER"])
        if self.provider == "local" and self.production:
            raise KeyConfigurationError(
                "the local KEK provider is for development only; in production set TS_KEK_PROVIDER "
                "to 'vault' (Vault/OpenBao Transit) or 'pkcs11' (HSM)"
            )
        if self.provider == "vault":
            self._check_vault()
        if self.provider == "pkcs11":
            for name in ("TS_PKCS11_LIB", "TS_PKCS11_TOKEN_LABEL", "TS_PKCS11_PIN"):
                if not self.get(name):
                    raise KeyConfigurationError(f"the pkcs11 KEK provider needs {name}")
        if self.production and not self.get("DATABASE_URL"):
            raise KeyConfigurationError(
                "DATABASE_URL must be set in production (keys are stored in the database)"
            )

    def _check_vault(self) -> None:
        address = self.get("TS_VAULT_ADDR", "VAULT_ADDR", "BAO_ADDR")
        if not address:
            raise KeyConfigurationError(
                "the vault KEK provider needs TS_VAULT_ADDR (e.g. https://vault:8200)"
            )
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KeyConfigurationError("TS_VAULT_ADDR must look like https://vault.example:8200")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise KeyConfigurationError(
                "TS_VAULT_ADDR uses plain http to a non-loopback host; use https (tokens and wrapped "
                "keys would cross the network in the clear)"
            )
        if not self.get("TS_VAULT_TOKEN", "VAULT_TOKEN", "BAO_TOKEN"):
            raise KeyConfigurationError("the vault KEK provider needs TS_VAULT_TOKEN (or VAULT_TOKEN)")
        if self.env.get("TS_VAULT_SKIP_VERIFY", "").strip().lower() in _TRUE:
            raise KeyConfigurationError("TS_VAULT_SKIP_VERIFY is not supported: give TS_VAULT_CACERT instead")

    @property
    def local_kek_path(self) -> Path:
        """The local provider's key file."""
        custom = self.get("TS_LOCAL_KEK_FILE")
        return Path(custom).expanduser().resolve() if custom else self.data_dir / "keys" / "kek.json"

    def local_passphrase(self, *, create: bool) -> bytes:
        """``TS_KEY_MASTER``, or in development a generated one kept in the data dir."""
        value = self.env.get("TS_KEY_MASTER", "")
        if value:
            return value.encode("utf-8")
        if self.production:  # pragma: no cover - the local provider is refused earlier
            raise KeyConfigurationError("TS_KEY_MASTER is required")
        path = self.data_dir / "keys" / "master.passphrase"
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise KeyConfigurationError(
                    f"{path} is accessible by group or others; run 'chmod 600 {path}'"
                )
            return path.read_bytes().strip()
        if not create:
            raise KeyNotFoundError(f"no development passphrase at {path}; run 'tensafe keys init'")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        phrase = secrets.token_urlsafe(32).encode("ascii")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return path.read_bytes().strip()
        with os.fdopen(fd, "wb") as out:
            out.write(phrase + b"\n")
            out.flush()
            os.fsync(out.fileno())
        return phrase


def open_provider(settings: KeySettings, *, create: bool) -> KekProvider:
    """Open the configured KEK provider (creating its key when ``create`` and allowed).

    Raises:
        KeyConfigurationError: The provider's configuration is incomplete or insecure.
        ProviderError: The provider could not be reached.
    """
    if settings.provider == "local":
        _log.warning(
            "DEVELOPMENT KEY CUSTODY: the KEK is a local file (%s) sealed under %s; anyone with "
            "this machine's disk can read it. Never use this in production (set TS_KEK_PROVIDER).",
            settings.local_kek_path,
            "TS_KEY_MASTER"
            if settings.env.get("TS_KEY_MASTER")
            else "a generated passphrase stored next to it",
        )
        path = settings.local_kek_path
        passphrase = settings.local_passphrase(create=create)
        if path.exists() or not create:
            return LocalKekProvider.open(path, passphrase=passphrase)
        try:
            return LocalKekProvider.create(path, passphrase=passphrase, params=Argon2idParams())
        except KeyConfigurationError:
            return LocalKekProvider.open(path, passphrase=passphrase)  # created concurrently
    if settings.provider == "vault":
        from tensafe.keys._vault import VaultTransitKekProvider

        vault = VaultTransitKekProvider(
            settings.get("TS_VAULT_ADDR", "VAULT_ADDR", "BAO_ADDR"),
            token=settings.get("TS_VAULT_TOKEN", "VAULT_TOKEN", "BAO_TOKEN"),
            mount=settings.get("TS_VAULT_TRANSIT_MOUNT") or "transit",
            key_name=settings.get("TS_VAULT_TRANSIT_KEY") or "tensafe-kek",
            ca_cert=settings.get("TS_VAULT_CACERT", "VAULT_CACERT") or None,
            namespace=settings.get("TS_VAULT_NAMESPACE", "VAULT_NAMESPACE") or None,
            create=create,
        )
        if settings.production and vault.exportable:
            vault.close()
            raise KeyConfigurationError(
                "the Transit KEK is exportable or allows plaintext backup; "
                "use a non-exportable key in production"
            )
        return vault
    from tensafe.keys._pkcs11 import Pkcs11KekProvider

    return Pkcs11KekProvider(
        settings.get("TS_PKCS11_LIB"),
        token_label=settings.get("TS_PKCS11_TOKEN_LABEL"),
        pin=settings.get("TS_PKCS11_PIN"),
        key_label=settings.get("TS_PKCS11_KEY_LABEL") or "tensafe-kek",
        create=create,
    )
