"""Persisted rollback state: the highest accepted version per package name (spec: "Rollback")."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensafe.package._semver import SemVer
from tensafe.package.errors import PackageStateError, RollbackError

__all__ = ["STATE_SCHEMA", "RollbackState", "default_state_path"]

STATE_SCHEMA = "tensafe.tssp.state/v1"
_MAX_STATE_BYTES = 16 << 20


def default_state_path() -> Path:
    """Return the default state file location.

    ``$TS_DATA_DIR/tssp-state.json`` if set, else
    ``${XDG_STATE_HOME:-~/.local/state}/tensafe/tssp-state.json``.
    """
    from tensafe.config import tssp_state_path

    return tssp_state_path()


class RollbackState:
    """The verifier's memory of accepted packages, stored as one JSON file.

    The file holds ``{"schema": ..., "accepted": {name: {"version": v, "header_sha256": h}}}``.
    Reads and updates take an exclusive ``flock`` on ``<file>.lock``; updates are written to a
    temporary file, fsynced and renamed over the old one, so a crash leaves the old or the new
    state, never a torn one. A corrupt file is an error, never silently reset.
    """

    def __init__(self, path: str | Path) -> None:
        """Use the state file at ``path`` (created on first acceptance)."""
        self._path = Path(path)

    @classmethod
    def default(cls) -> RollbackState:
        """The state at :func:`default_state_path`."""
        return cls(default_state_path())

    @property
    def path(self) -> Path:
        """Location of the state file."""
        return self._path

    def __repr__(self) -> str:
        return f"RollbackState({str(self._path)!r})"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(str(self._path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PackageStateError(
                f"cannot open rollback state {self._path}: {exc.strerror or exc}; "
                "pass --state with a writable location"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, Any]:
        try:
            with self._path.open("rb") as fh:
                raw = fh.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PackageStateError(
                f"cannot read rollback state {self._path}: {exc.strerror or exc}"
            ) from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        accepted = doc.get("accepted") if isinstance(doc, dict) else None
        if (
            len(raw) > _MAX_STATE_BYTES
            or not isinstance(doc, dict)
            or doc.get("schema") != STATE_SCHEMA
            or not isinstance(accepted, dict)
            or not all(
                isinstance(v, dict)
                and isinstance(v.get("version"), str)
                and isinstance(v.get("header_sha256"), str)
                for v in accepted.values()
            )
        ):
            raise PackageStateError(
                f"rollback state {self._path} is corrupt; it is never reset automatically: "
                "inspect it, restore it from a backup, or move it aside deliberately"
            )
        return accepted

    def _store(self, accepted: dict[str, Any]) -> None:
        data = json.dumps({"schema": STATE_SCHEMA, "accepted": accepted}, sort_keys=True, indent=1).encode()
        directory = self._path.parent
        fd, tmp = tempfile.mkstemp(prefix=".tssp-state-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PackageStateError(
                f"cannot write rollback state {self._path}: {exc.strerror or exc}"
            ) from None
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _check(entry: dict[str, Any] | None, name: str, version: str, header_sha256: str) -> None:
        if entry is None:
            return
        try:
            seen = SemVer.parse(entry["version"])
        except ValueError:
            raise PackageStateError(f"rollback state holds an invalid version for {name!r}") from None
        new = SemVer.parse(version)
        if new.precedence_key() < seen.precedence_key():
            raise RollbackError(
                f"rollback refused: {name} {version} is older than the accepted version {entry['version']}"
            )
        if new.precedence_key() == seen.precedence_key() and entry["header_sha256"] != header_sha256:
            raise RollbackError(
                f"version re-use refused: {name} {version} differs from the package accepted as "
                f"{entry['version']}"
            )

    def check(self, name: str, version: str, header_sha256: str) -> None:
        """Raise :class:`RollbackError` if ``name`` at ``version`` may not be accepted.

        Raises:
            RollbackError: The version is lower than the accepted one, or equal with other content.
            PackageStateError: The state file is unreadable or corrupt.
        """
        with self._locked():
            self._check(self._load().get(name), name, version, header_sha256)

    def accept(self, name: str, version: str, header_sha256: str) -> None:
        """Check again under the lock, then record ``name`` at ``version`` as accepted (atomically)."""
        with self._locked():
            accepted = self._load()
            self._check(accepted.get(name), name, version, header_sha256)
            current = accepted.get(name)
            if (
                current is not None
                and SemVer.parse(current["version"]).precedence_key()
                == SemVer.parse(version).precedence_key()
            ):
                return
            accepted[name] = {"version": version, "header_sha256": header_sha256}
            self._store(accepted)
