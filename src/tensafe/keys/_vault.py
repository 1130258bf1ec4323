"""The ``vault`` KEK provider: HashiCorp Vault / OpenBao Transit.

The KEK is a named Transit key (type ``aes256-gcm96``, not exportable) that never
leaves Vault. Wrapping a key is Transit ``encrypt`` of the key with the binding context
as ``associated_data`` (Transit's own versioned AES-256-GCM envelope,
``vault:v<N>:<base64>``, with the context authenticated by GCM); AES-256-KWP is not
used here because the KEK is not available outside Vault. The stored blob is
``tensafe-bound/v1:`` followed by Transit's ciphertext; a bare ``vault:v<N>:...`` blob is
the legacy, unbound format (encrypted without associated data), refused by
:meth:`VaultTransitKekProvider.unwrap` and only read by ``rebind``.

Rotation is Transit ``rotate``. Re-wrapping is Transit ``decrypt`` then ``encrypt``
with the same associated data: Transit ``rewrap`` does not take ``associated_data``
(checked against OpenBao 2.7: it fails with "message authentication failed" on a
ciphertext made with associated data), so the key is in this process's memory while it
is re-wrapped, as it is whenever the process uses it. The alternative, a ``derived``
Transit key with ``context``, would keep ``rewrap`` inside Vault but cannot be enabled
on an existing key (every deployment would need a new Transit key); see
docs/security/keys.md, "Binding".
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, ClassVar
from urllib.parse import urlsplit

from tensafe.keys._provider import KekProvider, check_context, unbound_key_error
from tensafe.keys.errors import KeyConfigurationError, KeyNotFoundError, ProviderError

__all__ = ["BOUND_PREFIX", "VaultTransitKekProvider", "is_loopback_host"]

_CIPHERTEXT = re.compile(r"vault:v([1-9][0-9]{0,9}):[A-Za-z0-9+/=]+")
#: Prefix of a blob whose Transit ciphertext authenticates the binding context.
BOUND_PREFIX = b"tensafe-bound/v1:"


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` names the local machine (``localhost``, 127.0.0.0/8 or ``::1``)."""
    if not host:
        return False
    if host == "localhost" or host == "::1":
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts)


class VaultTransitKekProvider(KekProvider):
    """KEK held in Vault/OpenBao Transit; wraps DEKs with Transit encrypt."""

    name: ClassVar[str] = "vault"

    def __init__(
        self,
        address: str,
        *,
        token: str,
        mount: str = "transit",
        key_name: str = "tensafe-kek",
        ca_cert: str | None = None,
        namespace: str | None = None,
        create: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        """Connect to Transit and check the key.

        Args:
            address: Vault address, ``https://host:8200`` (``http`` only for loopback).
            token: Vault token with read/encrypt/decrypt (and rotate, for rotation) on the key.
            mount: Mount path of the Transit engine.
            key_name: Name of the Transit key used as KEK.
            ca_cert: CA bundle to verify Vault's TLS certificate.
            namespace: Vault Enterprise / OpenBao namespace.
            create: Create the key (``aes256-gcm96``, not exportable) if it is missing.
            timeout_s: HTTP timeout per request.

        Raises:
            KeyConfigurationError: Bad address or token, or the key is missing and
                ``create`` is false.
            ProviderError: Vault could not be reached.
        """
        import hvac

        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KeyConfigurationError("the Vault address must look like https://vault.example:8200")
        if not token:
            raise KeyConfigurationError("no Vault token: set TS_VAULT_TOKEN (or VAULT_TOKEN)")
        self._address = address.rstrip("/")
        self._mount = mount
        self._key = key_name
        self._client = hvac.Client(
            url=self._address,
            token=token,
            verify=ca_cert if ca_cert else True,
            namespace=namespace,
            timeout=timeout_s,
        )
        info = self._read_key(missing_ok=create)
        if info is None:
            self._call(
                lambda: self._client.secrets.transit.create_key(
                    name=self._key, key_type="aes256-gcm96", exportable=False, mount_point=self._mount
                )
            )
            info = self._read_key(missing_ok=False)
        assert info is not None
        if info.get("type") != "aes256-gcm96":
            raise KeyConfigurationError(
                f"the Transit key {self._key!r} has type {info.get('type')!r}; TenSafe needs aes256-gcm96"
            )
        self._info = info

    def _call(self, fn: Any) -> Any:
        import hvac.exceptions

        try:
            return fn()
        except hvac.exceptions.Forbidden:
            raise ProviderError(
                f"Vault denied access to transit key {self._key!r} at {self._address} "
                "(check the token's policy)"
            ) from None
        except hvac.exceptions.InvalidPath:
            raise KeyNotFoundError(
                f"Vault has no transit key {self._key!r} under mount {self._mount!r}"
            ) from None
        except hvac.exceptions.VaultError as exc:
            # Vault's error texts name the failing check but never echo secrets.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProviderError(f"Vault transit request failed at {self._address}: {first[:200]}") from None
        except OSError as exc:  # requests' ConnectionError derives from OSError
            raise ProviderError(f"cannot reach Vault at {self._address}: {type(exc).__name__}") from None

    def _read_key(self, *, missing_ok: bool) -> dict[str, Any] | None:
        try:
            response = self._call(
                lambda: self._client.secrets.transit.read_key(name=self._key, mount_point=self._mount)
            )
        except KeyNotFoundError:
            if missing_ok:
                return None
            raise KeyConfigurationError(
                f"Vault has no transit key {self._key!r} under mount {self._mount!r}; "
                "run 'tensafe keys init' (or create it: bao write -f transit/keys/NAME type=aes256-gcm96)"
            ) from None
        return dict(response["data"])

    @property
    def exportable(self) -> bool:
        """Whether Vault would let anyone export the KEK (refused in production)."""
        return bool(self._info.get("exportable")) or bool(self._info.get("allow_plaintext_backup"))

    @property
    def current_version(self) -> int:
        """See :attr:`KekProvider.current_version`."""
        return int(self._info["latest_version"])

    def wrap(self, dek: bytes, *, context: bytes) -> tuple[int, bytes]:
        """See :meth:`KekProvider.wrap` (Transit encrypt with the context as associated data)."""
        ad = base64.b64encode(check_context(context)).decode("ascii")
        response = self._call(
            lambda: self._client.secrets.transit.encrypt_data(
                name=self._key,
                plaintext=base64.b64encode(dek).decode("ascii"),
                associated_data=ad,
                mount_point=self._mount,
            )
        )
        version, ciphertext = self._parse(response["data"]["ciphertext"])
        if version > self.current_version:  # rotated by another process meanwhile
            self._info["latest_version"] = version
        return version, BOUND_PREFIX + ciphertext

    @staticmethod
    def _parse(ciphertext: str) -> tuple[int, bytes]:
        match = _CIPHERTEXT.fullmatch(ciphertext)
        if match is None:
            raise ProviderError("Vault returned a ciphertext in an unexpected format")
        return int(match.group(1)), ciphertext.encode("ascii")

    @staticmethod
    def _check_ciphertext(kek_version: int, data: bytes) -> str:
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ProviderError("a stored Vault-wrapped key is malformed") from None
        match = _CIPHERTEXT.fullmatch(text)
        if match is None or int(match.group(1)) != kek_version:
            raise ProviderError("a stored Vault-wrapped key is malformed or does not match its KEK version")
        return text

    def _decrypt(self, ciphertext: str, *, associated_data: str | None) -> bytes:
        response = self._call(
            lambda: self._client.secrets.transit.decrypt_data(
                name=self._key,
                ciphertext=ciphertext,
                associated_data=associated_data,
                mount_point=self._mount,
            )
        )
        try:
            return base64.b64decode(response["data"]["plaintext"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise ProviderError("Vault returned a malformed plaintext") from None

    def unwrap(self, kek_version: int, blob: bytes, *, context: bytes) -> bytes:
        """See :meth:`KekProvider.unwrap` (Transit decrypt with the context as associated data).

        A blob moved to a row with another context fails Transit's GCM check; Vault
        answers "message authentication failed", raised as :class:`ProviderError`.
        """
        ad = base64.b64encode(check_context(context)).decode("ascii")
        data = bytes(blob)
        if self.is_legacy(data):
            raise unbound_key_error(self.name)
        if not data.startswith(BOUND_PREFIX):
            raise ProviderError("a stored Vault-wrapped key is malformed")
        text = self._check_ciphertext(kek_version, data[len(BOUND_PREFIX) :])
        return self._decrypt(text, associated_data=ad)

    def is_legacy(self, blob: bytes) -> bool:
        """See :meth:`KekProvider.is_legacy` (a bare ``vault:v<N>:...`` ciphertext)."""
        return bytes(blob).startswith(b"vault:")

    def _unwrap_legacy(self, kek_version: int, blob: bytes) -> bytes:
        return self._decrypt(self._check_ciphertext(kek_version, bytes(blob)), associated_data=None)

    def rotate(self) -> int:
        """See :meth:`KekProvider.rotate` (Transit rotate)."""
        self._call(lambda: self._client.secrets.transit.rotate_key(name=self._key, mount_point=self._mount))
        info = self._read_key(missing_ok=False)
        assert info is not None
        self._info = info
        return self.current_version

    def refresh(self) -> None:
        """Re-read the key's metadata (another process may have rotated it)."""
        info = self._read_key(missing_ok=False)
        assert info is not None
        self._info = info

    def describe(self) -> dict[str, object]:
        """See :meth:`KekProvider.describe` (never the token)."""
        return {
            "provider": self.name,
            "address": self._address,
            "mount": self._mount,
            "key": self._key,
            "current_version": self.current_version,
            "min_decryption_version": int(self._info.get("min_decryption_version", 1)),
            "exportable": self.exportable,
            "wrap": "Vault Transit encrypt (AES-256-GCM96), tenant and version as associated data",
        }

    def close(self) -> None:
        """Close the HTTP session."""
        adapter = getattr(self._client, "adapter", None)
        if adapter is not None and hasattr(adapter, "close"):
            adapter.close()
