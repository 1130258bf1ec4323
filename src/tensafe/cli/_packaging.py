"""Emit a TSSP package straight from a finished training run (``package:`` in the config).

Configuration keys (paths relative to the configuration file)::

    package:
      name: clinical-notes          # package name
      version: 1.0.0                # semantic version (verifiers refuse rollbacks)
      signing_key: keys/signing.key # hybrid signing key (tensafe tssp keygen)
      passphrase_env: TS_SIGNING_PASSPHRASE   # optional: env var holding the key's passphrase
      recipients: [keys/recipient.pub]        # one or more recipient public keys
      out: clinical-notes-1.0.0.tssp          # default: OUTPUT_DIR/NAME-VERSION.tssp
      expires_in_days: 365
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from tensafe.config import env_value
from tensafe.training.errors import TrainingConfigError

__all__ = ["package_run"]

_KEYS = {"name", "version", "signing_key", "passphrase_env", "recipients", "out", "expires_in_days"}


def package_run(adapter_dir: Path, cfg: Mapping[str, Any], *, base: Path | None) -> Path:
    """Pack ``adapter_dir`` (with its certificate and evidence) as configured; returns the path."""
    from tensafe.cli.tssp import _recipient_public, _signing_key
    from tensafe.package import pack
    from tensafe.training.models import resolve_model

    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise TrainingConfigError(f"unknown key(s) in 'package': {', '.join(unknown)}")
    for key in ("name", "version", "signing_key", "recipients"):
        if not cfg.get(key):
            raise TrainingConfigError(f"package.{key} is required to emit a package")
    root = base or Path.cwd()

    def path(value: Any) -> str:
        return str((root / str(value)).resolve())

    passphrase: bytes | None = None
    var = cfg.get("passphrase_env")
    if var:
        value = env_value(str(var))
        if not value:
            raise TrainingConfigError(f"package.passphrase_env: ${var} is not set")
        passphrase = value.encode()
    recipients = cfg["recipients"]
    if isinstance(recipients, str):
        recipients = [recipients]
    out = (
        Path(path(cfg["out"]))
        if cfg.get("out")
        else adapter_dir.parent / f"{cfg['name']}-{cfg['version']}.tssp"
    )
    import json

    base_model = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
        "base_model_name_or_path"
    )
    base_sha = resolve_model(base_model).revision if base_model else None
    written = pack(
        adapter_dir,
        out,
        name=str(cfg["name"]),
        version=str(cfg["version"]),
        signing_keys=[_signing_key(path(cfg["signing_key"]), passphrase)],
        recipients=[_recipient_public(path(r)) for r in recipients],
        expires_in=timedelta(days=int(cfg.get("expires_in_days", 365))),
        base_model_id=base_model,
        base_model_sha256=base_sha,
    )
    return Path(written)
