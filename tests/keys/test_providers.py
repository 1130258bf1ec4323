"""One contract suite run against every KEK provider's real service, plus per-provider checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import hvac
import hvac.exceptions
import pkcs11
import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from keys.conftest import PASSPHRASE, legacy_wrap
from tensafe.crypto.kdf import Argon2idParams
from tensafe.crypto.keywrap import unwrap_key, unwrap_key_bound, wrap_key, wrap_key_bound
from tensafe.keys import (
    KekProvider,
    KeyConfigurationError,
    KeyManagementError,
    KeyNotFoundError,
    LocalKekProvider,
    Pkcs11KekProvider,
    ProviderError,
    UnboundKeyError,
    VaultTransitKekProvider,
    dek_context,
    deployment_key_context,
)

CTX = dek_context(tenant="acme", version=1)
#: Contexts of other rows: another tenant, another version, the deployment key.
OTHER_CONTEXTS = [
    dek_context(tenant="globex", version=1),
    dek_context(tenant="acme", version=2),
    deployment_key_context(name="signing", key_id="00" * 16),
]


def _binding_digest(context: bytes) -> bytes:
    """Independent restatement of docs/spec/crypto.md §4.1 (not the recipe's code)."""
    return hashlib.sha256(b"tensafe/bound-key/v1" + context).digest()


# --- contract suite (every provider) ---------------------------------------------------------


@pytest.mark.integration
def test_wrap_unwrap_round_trip(provider: KekProvider) -> None:
    dek = os.urandom(32)
    version, blob = provider.wrap(dek, context=CTX)
    assert version == provider.current_version == 1
    assert dek not in blob
    assert provider.unwrap(version, blob, context=CTX) == dek
    assert not provider.is_legacy(blob)


@pytest.mark.integration
def test_a_blob_does_not_unwrap_under_another_rows_context(provider: KekProvider) -> None:
    """The attack at provider level: a wrapped key moved to another tenant's or version's row."""
    dek = os.urandom(32)
    version, blob = provider.wrap(dek, context=CTX)
    for other in OTHER_CONTEXTS:
        with pytest.raises(ProviderError):
            provider.unwrap(version, blob, context=other)
        with pytest.raises(ProviderError):
            provider.rewrap(version, blob, context=other)
    with pytest.raises(KeyManagementError, match="context"):
        provider.unwrap(version, blob, context=b"")
    with pytest.raises(KeyManagementError, match="context"):
        provider.wrap(dek, context=b"")
    assert provider.unwrap(version, blob, context=CTX) == dek  # the right row still works


@pytest.mark.integration
def test_rotation_keeps_old_versions_and_rewraps(
    provider: KekProvider, reopen: Callable[[KekProvider], KekProvider]
) -> None:
    dek = os.urandom(32)
    v1, blob1 = provider.wrap(dek, context=CTX)
    v2 = provider.rotate()
    assert v2 == v1 + 1 == provider.current_version
    assert provider.unwrap(v1, blob1, context=CTX) == dek
    v, blob2 = provider.rewrap(v1, blob1, context=CTX)
    assert v == v2 and blob2 != blob1
    assert provider.unwrap(v2, blob2, context=CTX) == dek
    with pytest.raises(ProviderError):  # the re-wrapped blob is still bound
        provider.unwrap(v2, blob2, context=OTHER_CONTEXTS[0])
    new_version, _ = provider.wrap(os.urandom(32), context=CTX)
    assert new_version == v2
    # A second instance (a restarted process) sees both versions.
    other = reopen(provider)
    try:
        assert other.current_version == v2
        assert other.unwrap(v1, blob1, context=CTX) == dek and other.unwrap(v2, blob2, context=CTX) == dek
    finally:
        other.close()


@pytest.mark.integration
def test_tampered_blob_and_unknown_version_fail(provider: KekProvider) -> None:
    version, blob = provider.wrap(os.urandom(32), context=CTX)
    damaged = bytearray(blob)
    damaged[-3] ^= 0x01 if provider.name != "vault" else 0  # keep vault's base64 valid below
    if provider.name == "vault":
        text = blob.decode()
        damaged = bytearray((text[:-6] + ("A" if text[-6] != "A" else "B") + text[-5:]).encode())
    with pytest.raises(ProviderError):
        provider.unwrap(version, bytes(damaged), context=CTX)
    with pytest.raises((KeyNotFoundError, ProviderError)):
        provider.unwrap(version + 5, blob, context=CTX)


@pytest.mark.integration
def test_legacy_blob_is_refused_until_rebound(provider: KekProvider, request: pytest.FixtureRequest) -> None:
    """A blob in the pre-binding format fails closed; rebind turns it into a bound blob."""
    dek = os.urandom(32)
    legacy = legacy_wrap(provider, dek, request)
    assert provider.is_legacy(legacy)
    with pytest.raises(UnboundKeyError, match="tensafe keys rebind"):
        provider.unwrap(1, legacy, context=CTX)
    with pytest.raises(UnboundKeyError):
        provider.rewrap(1, legacy, context=CTX)
    version, bound = provider.rebind(1, legacy, context=CTX)
    assert not provider.is_legacy(bound)
    assert provider.unwrap(version, bound, context=CTX) == dek
    with pytest.raises(ProviderError):
        provider.unwrap(version, bound, context=OTHER_CONTEXTS[0])
    with pytest.raises(ProviderError, match="not in the legacy format"):
        provider.rebind(version, bound, context=CTX)


@pytest.mark.integration
def test_a_bound_blob_cannot_be_downgraded_to_the_legacy_format(
    provider: KekProvider, request: pytest.FixtureRequest
) -> None:
    """Stripping the binding from a bound blob never yields a legacy blob that rebind would accept."""
    version, bound = provider.wrap(os.urandom(32), context=CTX)
    if provider.name == "vault":
        stripped = bound.removeprefix(b"tensafe-bound/v1:")  # a valid-looking Transit ciphertext
        assert provider.is_legacy(stripped)
        with pytest.raises(ProviderError, match="authentication"):  # GCM: the AD is missing
            provider.rebind(version, stripped, context=OTHER_CONTEXTS[0])
    else:
        relabelled = b"\x01\x02" + bound[2:]  # claims the legacy header; length gives it away
        assert not provider.is_legacy(relabelled)
        with pytest.raises(ProviderError):
            provider.rebind(version, relabelled, context=OTHER_CONTEXTS[0])
        with pytest.raises(ProviderError):
            provider.unwrap(version, relabelled, context=CTX)


@pytest.mark.integration
def test_describe_and_repr_hold_no_secrets(provider: KekProvider, request: pytest.FixtureRequest) -> None:
    text = json.dumps(provider.describe(), default=str) + repr(provider)
    assert provider.name in text
    secrets_ = [PASSPHRASE.decode()]
    if provider.name == "vault":
        secrets_.append(request.getfixturevalue("openbao").token)
    if provider.name == "pkcs11":
        token = request.getfixturevalue("softhsm_token")
        secrets_ += [token.user_pin, token.so_pin]
    for secret in secrets_:
        assert secret not in text


# --- local -----------------------------------------------------------------------------------


def test_local_file_is_private_versioned_and_rfc5649(local_provider: LocalKekProvider) -> None:
    path = local_provider.path
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    dek = os.urandom(32)
    version, blob = local_provider.wrap(dek, context=CTX)
    local_provider.rotate()
    doc = json.loads(path.read_text())
    assert doc["format"] == "tensafe-local-kek/v1" and doc["current"] == 2
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    assert PASSPHRASE not in path.read_bytes()
    # Independent oracle: pyca's RFC 5649 unwrap of the raw body with the version-1 KEK gives
    # the DEK followed by the binding digest computed here from the spec.
    kek = local_provider._keks[version]
    assert blob[:2] == b"\x01\x04" and len(blob) == 74
    assert aes_key_unwrap_with_padding(kek, blob[2:]) == dek + _binding_digest(CTX)


def test_local_wrong_passphrase_and_tampering_are_refused(local_provider: LocalKekProvider) -> None:
    path = local_provider.path
    with pytest.raises(KeyConfigurationError, match="does not open"):
        LocalKekProvider.open(path, passphrase=b"another passphrase 123456")
    local_provider.rotate()
    original = path.read_text()
    for mutate in (
        lambda d: d.update(current=1),
        lambda d: d["versions"].pop(),
        lambda d: d["versions"].reverse(),
        lambda d: d["kdf"].update(params=Argon2idParams.minimum().encode().hex()[:-2] + "02"),
    ):
        doc = json.loads(original)
        mutate(doc)
        path.write_text(json.dumps(doc))
        os.chmod(path, 0o600)
        with pytest.raises(KeyConfigurationError):
            LocalKekProvider.open(path, passphrase=PASSPHRASE)
    path.write_text(original)
    os.chmod(path, 0o640)
    with pytest.raises(KeyConfigurationError, match="chmod 600"):
        LocalKekProvider.open(path, passphrase=PASSPHRASE)


def test_local_create_never_overwrites(local_provider: LocalKekProvider) -> None:
    before = local_provider.path.read_bytes()
    with pytest.raises(KeyConfigurationError, match="refusing to overwrite"):
        LocalKekProvider.create(local_provider.path, passphrase=PASSPHRASE, params=Argon2idParams.minimum())
    assert local_provider.path.read_bytes() == before


def test_local_concurrent_rotations_keep_every_version(local_provider: LocalKekProvider) -> None:
    other = LocalKekProvider.open(local_provider.path, passphrase=PASSPHRASE)
    v_a, blob_a = local_provider.wrap(os.urandom(32), context=CTX)
    assert local_provider.rotate() == 2
    assert other.rotate() == 3  # re-reads the file under the lock first
    reread = LocalKekProvider.open(local_provider.path, passphrase=PASSPHRASE)
    assert reread.versions == [1, 2, 3]
    assert len(reread.unwrap(v_a, blob_a, context=CTX)) == 32


def test_local_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyNotFoundError, match="tensafe keys init"):
        LocalKekProvider.open(tmp_path / "none.json", passphrase=PASSPHRASE)


# --- vault / OpenBao -------------------------------------------------------------------------


@pytest.mark.integration
def test_vault_kek_is_not_exportable_and_blob_is_transit(
    vault_provider: VaultTransitKekProvider, openbao
) -> None:
    dek = os.urandom(32)
    _version, blob = vault_provider.wrap(dek, context=CTX)
    assert blob.startswith(b"tensafe-bound/v1:vault:v1:")
    client = hvac.Client(url=openbao.address, token=openbao.token)
    key = vault_provider.describe()["key"]
    with pytest.raises(hvac.exceptions.VaultError):
        client.secrets.transit.export_key(name=key, key_type="encryption-key")
    assert vault_provider.exportable is False
    # Independent oracle: OpenBao itself decrypts the ciphertext with the context as
    # associated data, and refuses it without (Transit's native GCM binding).
    ciphertext = blob.removeprefix(b"tensafe-bound/v1:").decode()
    plain = client.secrets.transit.decrypt_data(
        name=key, ciphertext=ciphertext, associated_data=base64.b64encode(CTX).decode()
    )["data"]["plaintext"]
    assert base64.b64decode(plain) == dek
    with pytest.raises(hvac.exceptions.VaultError, match="authentication"):
        client.secrets.transit.decrypt_data(name=key, ciphertext=ciphertext)
    # A blob claiming another version is refused before contacting Vault.
    with pytest.raises(ProviderError):
        vault_provider.unwrap(2, blob, context=CTX)


@pytest.mark.integration
def test_vault_bad_token_and_missing_key(openbao, openbao_transit_key: str) -> None:
    with pytest.raises(ProviderError, match="denied"):
        VaultTransitKekProvider(openbao.address, token="not-a-token", key_name=openbao_transit_key)
    with pytest.raises(KeyConfigurationError, match="no transit key"):
        VaultTransitKekProvider(openbao.address, token=openbao.token, key_name=openbao_transit_key)
    with pytest.raises(ProviderError, match="cannot reach"):
        VaultTransitKekProvider("http://127.0.0.1:9", token="x", key_name="k", timeout_s=2)


# --- pkcs11 / SoftHSM2 -----------------------------------------------------------------------


def _open_session(softhsm_token):
    """A session of our own; if a provider already logged this process in, reuse that login."""
    token = pkcs11.lib(softhsm_token.library).get_token(token_label=softhsm_token.label)
    try:
        return token.open(user_pin=softhsm_token.user_pin, rw=True)
    except p11e.UserAlreadyLoggedIn:
        return token.open(rw=True)


@pytest.mark.integration
def test_pkcs11_kek_never_leaves_the_token(pkcs11_provider: Pkcs11KekProvider, softhsm_token) -> None:
    with _open_session(softhsm_token) as session:
        kek = session.get_key(object_class=ObjectClass.SECRET_KEY, label="tensafe-kek")
        assert kek[Attribute.EXTRACTABLE] is False
        assert kek[Attribute.SENSITIVE] is True
        assert kek[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(p11e.AttributeSensitive):
            kek[Attribute.VALUE]
        other = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
        with pytest.raises(p11e.KeyUnextractable):
            other.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD)


@pytest.mark.integration
def test_pkcs11_wrap_is_byte_identical_to_software_kwp(softhsm_token) -> None:
    """The token's CKM_AES_KEY_WRAP_PAD output equals tensafe.crypto.keywrap (RFC 5649 is deterministic)."""
    test_kek = os.urandom(32)
    dek = os.urandom(32)
    with _open_session(softhsm_token) as session:
        kek = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: test_kek,
                Attribute.TOKEN: False,
                Attribute.WRAP: True,
                Attribute.UNWRAP: True,
            }
        )
        obj = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: dek,
                Attribute.TOKEN: False,
                Attribute.EXTRACTABLE: True,
                Attribute.SENSITIVE: False,
            }
        )
        hsm_blob = b"\x01\x02" + bytes(kek.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    assert hsm_blob == wrap_key(test_kek, dek)
    assert unwrap_key(test_kek, hsm_blob) == dek


@pytest.mark.integration
def test_pkcs11_bound_wrap_is_byte_identical_to_the_software_recipe(
    pkcs11_provider: Pkcs11KekProvider, softhsm_token
) -> None:
    """The provider's token-side bound wrap equals tensafe.crypto.keywrap.wrap_key_bound (and back).

    The provider's KEK version 1 is pointed at a session key with a known value, so the
    real provider code path (session objects, CKM_AES_KEY_WRAP_PAD, framing, digest
    check) is compared byte for byte with the software recipe and pyca's RFC 5649.
    """
    test_kek = os.urandom(32)
    dek = os.urandom(32)
    with _open_session(softhsm_token) as session:
        kek = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: test_kek,
                Attribute.TOKEN: False,
                Attribute.WRAP: True,
                Attribute.UNWRAP: True,
            }
        )
        pkcs11_provider._keys[1] = kek
        version, blob = pkcs11_provider.wrap(dek, context=CTX)
        assert version == 1
        assert blob == wrap_key_bound(test_kek, dek, context=CTX)
        assert aes_key_unwrap_with_padding(test_kek, blob[2:]) == dek + _binding_digest(CTX)
        software = wrap_key_bound(test_kek, dek, context=OTHER_CONTEXTS[1])
        assert pkcs11_provider.unwrap(1, software, context=OTHER_CONTEXTS[1]) == dek
        with pytest.raises(ProviderError, match="bound to another"):
            pkcs11_provider.unwrap(1, software, context=CTX)
        assert unwrap_key_bound(test_kek, blob, context=CTX) == dek


@pytest.mark.integration
def test_pkcs11_wrong_pin_and_missing_kek(softhsm_token) -> None:
    with pytest.raises(KeyConfigurationError, match="PIN"):
        Pkcs11KekProvider(softhsm_token.library, token_label=softhsm_token.label, pin="000000")
    with pytest.raises(KeyConfigurationError, match="tensafe keys init"):
        Pkcs11KekProvider(softhsm_token.library, token_label=softhsm_token.label, pin=softhsm_token.user_pin)
    with pytest.raises(KeyConfigurationError, match="no PKCS#11 token"):
        Pkcs11KekProvider(softhsm_token.library, token_label="nope", pin=softhsm_token.user_pin)
