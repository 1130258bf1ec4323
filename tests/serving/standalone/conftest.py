"""Fixtures of the ``tensafe serve`` tests: keys, a real adapter of the tiny model, real packages.

* ``serve_keys`` (session): the publisher's signing key, a second (untrusted) signer, the
  serving recipient key and another recipient's key.
* ``adapter_dir`` (session): a PEFT LoRA adapter of the tiny model (``make_lora_adapter``,
  random non-zero ``A`` and ``B``) written as a directory, ready for ``tensafe tssp pack``.
* ``make_package(**pack_kwargs)``: packs ``adapter_dir`` with :func:`tensafe.package.pack`
  (default name ``clinical``, version ``1.0.0``, signed by the publisher, for the serving
  recipient, base model ``tensafe-test/tiny-llama``); returns the ``.tssp`` path.
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tensafe.crypto.kem import HybridKemPrivateKey
from tensafe.crypto.signing import HybridSigningKey

#: The served base model's name (the tiny Llama of ``tests/serving/conftest.py``).
BASE = "tensafe-test/tiny-llama"


@dataclass(frozen=True)
class ServeKeys:
    """Keys of the package tests."""

    publisher: HybridSigningKey
    stranger: HybridSigningKey
    recipient: HybridKemPrivateKey
    other_recipient: HybridKemPrivateKey


@pytest.fixture(scope="session")
def serve_keys() -> ServeKeys:
    return ServeKeys(
        publisher=HybridSigningKey.generate(),
        stranger=HybridSigningKey.generate(),
        recipient=HybridKemPrivateKey.generate(),
        other_recipient=HybridKemPrivateKey.generate(),
    )


@pytest.fixture(scope="session")
def adapter_dir(
    serving_model_dir: pathlib.Path,
    make_lora_adapter: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> pathlib.Path:
    adapter = make_lora_adapter(serving_model_dir, rank=4, seed=11, base_model_id=BASE)
    directory = tmp_path_factory.mktemp("clinical-adapter")
    for name, data in adapter.files.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def make_package(
    tmp_path: pathlib.Path, adapter_dir: pathlib.Path, serve_keys: ServeKeys
) -> Callable[..., pathlib.Path]:
    counter = itertools.count()

    def _make(adapter: pathlib.Path | None = None, **kwargs: Any) -> pathlib.Path:
        from tensafe.package import pack

        kwargs.setdefault("name", "clinical")
        kwargs.setdefault("version", "1.0.0")
        kwargs.setdefault("signing_keys", [serve_keys.publisher])
        kwargs.setdefault("recipients", [serve_keys.recipient.public_key()])
        kwargs.setdefault("base_model_id", BASE)
        out = tmp_path / f"{kwargs['name']}-{kwargs['version']}-{next(counter)}.tssp"
        pack(adapter or adapter_dir, out, **kwargs)
        return out

    return _make
