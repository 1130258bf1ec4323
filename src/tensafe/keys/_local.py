"""The ``local`` KEK provider: KEK versions in a file sealed under a passphrase.

For development and tests only; production refuses it (see ``docs/security/keys.md``).

File format ``tensafe-local-kek/v1`` (UTF-8 JSON, mode 0600)::

    {
      "format": "tensafe-local-kek/v1",
      "kdf": {"alg": "argon2id", "salt": "<32 hex>", "params": "<Argon2idParams.encode() hex>"},
      "current": 2,
      "versions": [{"version": 1, "created_at": "<ISO 8601 UTC>", "sealed_kek": "<base64>"}, ...],
      "mac": "<base64>"
    }

The master key is Argon2id(passphrase, salt, params). Each ``sealed_kek`` is
``tensafe.crypto.aead.seal(master, kek, label="tensafe/local-kek/v1",
associated_data=b"version:<n>")``. ``mac`` is ``seal(master, b"",
label="tensafe/local-kek-file/v1", associated_data=<canonical JSON of every other
field>)``, so removing a version, changing ``current`` or swapping sealed KEKs between
versions is detected.

Keys are wrapped with AES-256-KWP bound to their context
(:func:`tensafe.crypto.keywrap.wrap_key_bound`, prefix ``0x01 0x04``; docs/spec/crypto.md,
"Bound wrapped key"). Blobs of the legacy, unbound format ``0x01 0x02`` (plain
:func:`~tensafe.crypto.keywrap.wrap_key` of a 256-bit key, written before binding) are
refused by :meth:`LocalKekProvider.unwrap` and only read by ``rebind``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from tensafe.crypto.aead import open_sealed, seal
from tensafe.crypto.errors import CryptoError
from tensafe.crypto.kdf import Argon2idParams, derive_key_from_passphrase
from tensafe.crypto.keywrap import WRAP_PREFIX, unwrap_key, unwrap_key_bound, wrap_key_bound
from tensafe.keys._provider import WRAPPED_KEY_BYTES, KekProvider, check_context, unbound_key_error
from tensafe.keys.errors import KeyConfigurationError, KeyNotFoundError, ProviderError

__all__ = ["LocalKekProvider"]

_FORMAT = "tensafe-local-kek/v1"
_LABEL_KEK = "tensafe/local-kek/v1"
_LABEL_FILE = "tensafe/local-kek-file/v1"
#: A legacy blob: 0x01 0x02 || RFC 5649 output of a 256-bit key (8 + 32 bytes).
_LEGACY_LENGTH = len(WRAP_PREFIX) + 8 + WRAPPED_KEY_BYTES


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.b64decode(text, validate=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of the key file between processes."""
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class LocalKekProvider(KekProvider):
    """KEK versions kept in a passphrase-sealed file (development only).

    Use :meth:`open` to load an existing file or :meth:`create` to make a new one.
    """

    name: ClassVar[str] = "local"

    def __init__(self, path: Path, master: bytes, document: dict[str, Any]) -> None:
        """Use :meth:`open` or :meth:`create`; this constructor trusts its arguments."""
        self._path = path
        self._master = master
        self._doc = document
        self._keks = self._unseal_all(document)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        passphrase: bytes,
        params: Argon2idParams | None = None,
    ) -> LocalKekProvider:
        """Create a new key file holding KEK version 1.

        Args:
            path: Where to write the file (its directory is created with mode 0700).
            passphrase: The passphrase sealing the file.
            params: Argon2id cost; defaults to :class:`Argon2idParams` defaults.

        Raises:
            KeyConfigurationError: The file already exists (never overwritten).
        """
        target = Path(path)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        params = params or Argon2idParams()
        salt = secrets.token_bytes(16)
        master = derive_key_from_passphrase(passphrase, salt=salt, params=params)
        with _locked(target):
            if target.exists():
                raise KeyConfigurationError(f"refusing to overwrite the existing KEK file {target}")
            doc: dict[str, Any] = {
                "format": _FORMAT,
                "kdf": {"alg": "argon2id", "salt": salt.hex(), "params": params.encode().hex()},
                "current": 0,
                "versions": [],
            }
            cls._add_version(doc, master)
            _write_atomic(target, cls._serialize(doc, master))
        return cls(target, master, doc)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, passphrase: bytes, min_params: Argon2idParams | None = None
    ) -> LocalKekProvider:
        """Load an existing key file.

        Args:
            path: The key file.
            passphrase: The passphrase it was sealed with.
            min_params: If given, refuse files whose Argon2id cost is below it.

        Raises:
            KeyNotFoundError: The file does not exist.
            KeyConfigurationError: The file is readable by group or others, malformed,
                sealed with a different passphrase or modified, or too weakly derived.
        """
        target = Path(path)
        try:
            st = target.stat()
        except FileNotFoundError:
            raise KeyNotFoundError(f"no KEK file at {target}; run 'tensafe keys init'") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyConfigurationError(
                f"the KEK file {target} is accessible by group or others; run 'chmod 600 {target}'"
            )
        doc, master = cls._load(target, passphrase)
        if min_params is not None:
            params = Argon2idParams.decode(bytes.fromhex(doc["kdf"]["params"]))
            if (params.memory_cost, params.iterations) < (min_params.memory_cost, min_params.iterations):
                raise KeyConfigurationError(
                    f"the KEK file {target} uses Argon2id parameters below the minimum"
                )
        return cls(target, master, doc)

    @staticmethod
    def _load(path: Path, passphrase: bytes) -> tuple[dict[str, Any], bytes]:
        bad = KeyConfigurationError(
            f"the KEK file {path} does not open: wrong TS_KEY_MASTER passphrase, or the file was modified"
        )
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise bad
            kdf = doc["kdf"]
            if kdf.get("alg") != "argon2id":
                raise bad
            params = Argon2idParams.decode(bytes.fromhex(kdf["params"]))
            salt = bytes.fromhex(kdf["salt"])
            mac = _unb64(doc["mac"])
        except (ValueError, KeyError, TypeError, CryptoError, binascii.Error):
            raise bad from None
        master = derive_key_from_passphrase(passphrase, salt=salt, params=params)
        body = {k: v for k, v in doc.items() if k != "mac"}
        try:
            open_sealed(master, mac, label=_LABEL_FILE, associated_data=_canonical(body))
        except CryptoError:
            raise bad from None
        return body, master

    @staticmethod
    def _serialize(doc: dict[str, Any], master: bytes) -> bytes:
        body = {k: v for k, v in doc.items() if k != "mac"}
        mac = seal(master, b"", label=_LABEL_FILE, associated_data=_canonical(body))
        return json.dumps({**body, "mac": _b64(mac)}, sort_keys=True, indent=2).encode() + b"\n"

    @staticmethod
    def _add_version(doc: dict[str, Any], master: bytes) -> int:
        version = max((int(v["version"]) for v in doc["versions"]), default=0) + 1
        kek = secrets.token_bytes(32)
        sealed = seal(master, kek, label=_LABEL_KEK, associated_data=f"version:{version}".encode())
        doc["versions"].append(
            {
                "version": version,
                "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "sealed_kek": _b64(sealed),
            }
        )
        doc["current"] = version
        return version

    def _unseal_all(self, doc: dict[str, Any]) -> dict[int, bytes]:
        keks: dict[int, bytes] = {}
        try:
            for entry in doc["versions"]:
                version = int(entry["version"])
                keks[version] = open_sealed(
                    self._master,
                    _unb64(entry["sealed_kek"]),
                    label=_LABEL_KEK,
                    associated_data=f"version:{version}".encode(),
                )
            if int(doc["current"]) not in keks:
                raise ValueError("current version missing")
        except (ValueError, KeyError, TypeError, CryptoError, binascii.Error):
            raise KeyConfigurationError(f"the KEK file {self._path} is malformed") from None
        return keks

    # -- KekProvider --------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    @property
    def current_version(self) -> int:
        """See :attr:`KekProvider.current_version`."""
        return int(self._doc["current"])

    @property
    def versions(self) -> list[int]:
        """Every KEK version in the file, oldest first."""
        return sorted(self._keks)

    def wrap(self, dek: bytes, *, context: bytes) -> tuple[int, bytes]:
        """See :meth:`KekProvider.wrap` (AES-256-KWP bound to ``context``)."""
        ctx = check_context(context)
        version = self.current_version
        return version, wrap_key_bound(self._keks[version], dek, context=ctx)

    def _kek(self, kek_version: int) -> bytes:
        kek = self._keks.get(kek_version)
        if kek is None:
            self._reload()
            kek = self._keks.get(kek_version)
        if kek is None:
            raise KeyNotFoundError(f"the local KEK file {self._path} has no KEK version {kek_version}")
        return kek

    def unwrap(self, kek_version: int, blob: bytes, *, context: bytes) -> bytes:
        """See :meth:`KekProvider.unwrap`."""
        ctx = check_context(context)
        if self.is_legacy(blob):
            raise unbound_key_error(self.name)
        kek = self._kek(kek_version)
        try:
            return unwrap_key_bound(kek, blob, context=ctx)
        except CryptoError:
            raise ProviderError(
                f"a wrapped key did not unwrap under local KEK version {kek_version}: it belongs to "
                "another tenant or DEK version (moved in the database), was modified, or the key is wrong"
            ) from None

    def is_legacy(self, blob: bytes) -> bool:
        """See :meth:`KekProvider.is_legacy` (``0x01 0x02`` and 42 bytes)."""
        return bytes(blob[:2]) == WRAP_PREFIX and len(blob) == _LEGACY_LENGTH

    def _unwrap_legacy(self, kek_version: int, blob: bytes) -> bytes:
        kek = self._kek(kek_version)
        try:
            return unwrap_key(kek, blob)
        except CryptoError:
            raise ProviderError(
                f"a legacy wrapped key did not unwrap under local KEK version {kek_version} "
                "(modified or wrong key)"
            ) from None

    def _reload(self) -> None:
        """Pick up versions another process added (same passphrase-derived master key)."""
        try:
            doc = json.loads(self._path.read_bytes())
            mac = _unb64(doc["mac"])
            body = {k: v for k, v in doc.items() if k != "mac"}
            open_sealed(self._master, mac, label=_LABEL_FILE, associated_data=_canonical(body))
        except (ValueError, KeyError, TypeError, CryptoError, binascii.Error, OSError):
            raise KeyConfigurationError(f"the KEK file {self._path} changed and no longer opens") from None
        self._keks = self._unseal_all(body)
        self._doc = body

    def rotate(self) -> int:
        """See :meth:`KekProvider.rotate`; the file is rewritten atomically under a lock."""
        with _locked(self._path):
            self._reload()
            doc = json.loads(json.dumps(self._doc))
            version = self._add_version(doc, self._master)
            _write_atomic(self._path, self._serialize(doc, self._master))
            self._doc = doc
            self._keks = self._unseal_all(doc)
        return version

    def describe(self) -> dict[str, object]:
        """See :meth:`KekProvider.describe`."""
        params = Argon2idParams.decode(bytes.fromhex(self._doc["kdf"]["params"]))
        return {
            "provider": self.name,
            "path": str(self._path),
            "current_version": self.current_version,
            "versions": self.versions,
            "wrap": "AES-256-KWP (RFC 5649) bound to tenant and version",
            "kdf": f"argon2id m={params.memory_cost}KiB t={params.iterations} p={params.lanes}",
        }
