"""Fixtures for key-management tests: real providers, a migrated database, tenants."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import hvac
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.keywrap import wrap_key
from tensafe.db import create_engine_from_url, ensure_tenant
from tensafe.keys import KekProvider, LocalKekProvider, Pkcs11KekProvider, VaultTransitKekProvider

PASSPHRASE = b"correct horse battery staple 4711"
PROVIDERS = ["local", "vault", "pkcs11"]


@pytest.fixture
def local_provider(tmp_path: Path) -> Iterator[LocalKekProvider]:
    provider = LocalKekProvider.create(
        tmp_path / "keys" / "kek.json", passphrase=PASSPHRASE, params=Argon2idParams.minimum()
    )
    yield provider
    provider.close()


@pytest.fixture
def vault_provider(openbao, openbao_transit_key: str) -> Iterator[VaultTransitKekProvider]:
    provider = VaultTransitKekProvider(
        openbao.address, token=openbao.token, key_name=openbao_transit_key, create=True
    )
    yield provider
    provider.close()


@pytest.fixture
def pkcs11_provider(softhsm_token) -> Iterator[Pkcs11KekProvider]:
    provider = Pkcs11KekProvider(
        softhsm_token.library, token_label=softhsm_token.label, pin=softhsm_token.user_pin, create=True
    )
    yield provider
    provider.close()


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> KekProvider:
    """Each KEK provider, backed by its real service (file, OpenBao, SoftHSM2)."""
    value: KekProvider = request.getfixturevalue(f"{request.param}_provider")
    return value


@pytest.fixture
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[KekProvider], KekProvider]:
    """Open a second, independent instance of the same provider (as a restarted process would)."""

    def _reopen(p: KekProvider) -> KekProvider:
        if isinstance(p, LocalKekProvider):
            return LocalKekProvider.open(p.path, passphrase=PASSPHRASE)
        if isinstance(p, VaultTransitKekProvider):
            server = request.getfixturevalue("openbao")
            return VaultTransitKekProvider(server.address, token=server.token, key_name=p.describe()["key"])  # type: ignore[arg-type]
        token = request.getfixturevalue("softhsm_token")
        return Pkcs11KekProvider(token.library, token_label=token.label, pin=token.user_pin)

    return _reopen


@pytest.fixture
def engine(migrated_database_url: str) -> Iterator[Engine]:
    eng = create_engine_from_url(migrated_database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def make_tenant(engine: Engine) -> Callable[[], str]:
    def _make() -> str:
        tenant_id = "t-" + secrets.token_hex(4)
        with Session(engine) as session, session.begin():
            ensure_tenant(session, tenant_id)
        return tenant_id

    return _make


def legacy_wrap(provider: KekProvider, key: bytes, request: pytest.FixtureRequest) -> bytes:
    """Wrap ``key`` under the provider's current KEK exactly as TenSafe did before binding.

    local: ``tensafe.crypto.keywrap.wrap_key`` (``0x01 0x02`` AES-256-KWP); vault: Transit
    ``encrypt`` without associated data (a bare ``vault:v<N>:...``); pkcs11: the token's
    ``CKM_AES_KEY_WRAP_PAD`` of an AES session object, prefixed ``0x01 0x02``.
    """
    if isinstance(provider, LocalKekProvider):
        return wrap_key(provider._keks[provider.current_version], key)
    if isinstance(provider, VaultTransitKekProvider):
        server = request.getfixturevalue("openbao")
        client = hvac.Client(url=server.address, token=server.token)
        response = client.secrets.transit.encrypt_data(
            name=provider.describe()["key"], plaintext=base64.b64encode(key).decode()
        )
        return str(response["data"]["ciphertext"]).encode("ascii")
    assert isinstance(provider, Pkcs11KekProvider)
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    temp = provider._session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: key,
            Attribute.TOKEN: False,
            Attribute.EXTRACTABLE: True,
            Attribute.SENSITIVE: False,
        }
    )
    try:
        kek = provider._key(provider.current_version)
        return b"\x01\x02" + bytes(kek.wrap_key(temp, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    finally:
        temp.destroy()


@pytest.fixture
def dev_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A development deployment of its own: no key variables, ``TS_DATA_DIR`` and ``DATABASE_URL``
    under ``tmp_path`` (for the CLI tests, which build their key manager from the environment)."""
    for name in (
        "TS_ENVIRONMENT",
        "TS_KEK_PROVIDER",
        "TS_KEY_MASTER",
        "TS_LOCAL_KEK_FILE",
        "TS_ARTIFACT_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    env = {"TS_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": f"sqlite:///{tmp_path / 'keys.db'}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
