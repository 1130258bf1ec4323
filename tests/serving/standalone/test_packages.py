"""Packages as adapter sources: admission (verify, decrypt in memory, base model) and expiry.

Every refusal case performs the attack on a real package built by :func:`tensafe.package.pack`
from a real PEFT adapter of the tiny model: a modified payload or manifest, an expired package,
a signer the operator does not trust, a package for another recipient, a policy denial, another
base model (by name or by pinned weight hash), a rollback. The in-memory decryption is checked
against the on-disk :func:`tensafe.package.unpack` (an independent path) while every file
opened for writing is recorded.
"""

from __future__ import annotations

import builtins
import datetime as dt
import os
import pathlib
from collections.abc import Callable
from typing import Any

import pytest

from serving.standalone.conftest import BASE, ServeKeys
from tensafe.package import PackageEvent, RollbackState, unpack
from tensafe.serving.errors import AdapterRefusedError, AdapterUnavailableError, ModelNotFoundError
from tensafe.serving.packages import AdmittedPackage, PackageAdmission, PackageSource
from tensafe.serving.registry import ServingCaller

ACME = ServingCaller(tenant="acme", actor="apikey:key_a")
GLOBEX = ServingCaller(tenant="globex", actor="apikey:key_g")


class ListSink:
    """Collects the TSSP audit events of each decision."""

    def __init__(self) -> None:
        self.events: list[PackageEvent] = []

    def append(self, event: PackageEvent) -> None:
        self.events.append(event)


def _admission(
    keys: ServeKeys,
    tmp_path: pathlib.Path,
    sink: ListSink | None = None,
    **overrides: Any,
) -> PackageAdmission:
    kwargs: dict[str, Any] = {
        "trust": [keys.publisher.verifying_key()],
        "recipient_key": keys.recipient,
        "policy": None,
        "state": RollbackState(tmp_path / "state" / "tssp-state.json"),
        "audit": sink,
        "base_model": BASE,
        "base_model_sha256": "ab" * 32,
    }
    kwargs.update(overrides)
    (tmp_path / "state").mkdir(exist_ok=True)
    return PackageAdmission(**kwargs)


def test_admit_decrypts_in_memory_and_matches_the_on_disk_unpack(
    make_package: Callable[..., pathlib.Path],
    adapter_dir: pathlib.Path,
    serve_keys: ServeKeys,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = make_package()
    sink = ListSink()
    admission = _admission(serve_keys, tmp_path, sink)
    written: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def spy_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            written.append(str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(builtins, "open", spy_open)
    admitted = admission.admit(package)
    monkeypatch.undo()

    # Only the rollback state (outside any adapter data) was written.
    state_dir = str(tmp_path / "state")
    assert written and all(p.startswith(state_dir) for p in written), written
    assert admitted.name == "clinical" and admitted.model == "clinical@1.0.0"
    assert [e.event_id for e in sink.events] == ["tssp.unpack.accepted"]
    # Oracle 1: the adapter files that went into the package.
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert admitted.files[name] == (adapter_dir / name).read_bytes()
    # Oracle 2: the on-disk unpack of the same package.
    out = tmp_path / "unpacked"
    unpack(
        package,
        out,
        recipient_key=serve_keys.recipient,
        trust=[serve_keys.publisher.verifying_key()],
        state=None,
    )
    for name, data in admitted.files.items():
        assert (out / name).read_bytes() == data
    assert len(repr(admitted)) < 100  # the weights never reach a repr (logs, tracebacks)


def _flip(path: pathlib.Path, offset: int) -> pathlib.Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _refusals() -> list[Any]:
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    deny_clinical = (
        'package tensafe.tssp\nimport rego.v1\ndeny contains "clinical adapters are not admitted here" '
        'if input.manifest.name == "clinical"\n'
    )
    return [
        pytest.param(
            lambda mk, keys: _flip(mk(), -5),
            {},
            {},
            "modified, truncated or extended",
            "tssp.decrypt.failed",
            id="tampered-payload",
        ),
        pytest.param(lambda mk, keys: _flip(mk(), 40), {}, {}, "", None, id="tampered-header"),
        pytest.param(
            lambda mk, keys: mk(), {}, {"now": far}, "expired", "tssp.package.expired", id="expired"
        ),
        pytest.param(
            lambda mk, keys: mk(signing_keys=[keys.stranger]),
            {},
            {},
            "trust store",
            "tssp.signer.untrusted",
            id="untrusted-signer",
        ),
        pytest.param(
            lambda mk, keys: mk(recipients=[keys.other_recipient.public_key()]),
            {},
            {},
            "not a recipient",
            "tssp.recipient.unknown",
            id="wrong-recipient-key",
        ),
        pytest.param(
            lambda mk, keys: mk(),
            {"policy": deny_clinical},
            {},
            "clinical adapters are not admitted here",
            "tssp.policy.denied",
            id="policy-denial",
        ),
        pytest.param(
            lambda mk, keys: mk(base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
            {},
            {},
            "is for base model",
            "tssp.unpack.accepted",
            id="wrong-base-model",
        ),
        pytest.param(
            lambda mk, keys: mk(base_model_sha256="cd" * 32),
            {},
            {},
            "pins base model weights",
            "tssp.unpack.accepted",
            id="wrong-base-weights",
        ),
    ]


@pytest.mark.parametrize(("build", "rules", "call", "message", "event"), _refusals())
def test_every_refusal_stops_with_one_clear_line(
    build: Callable[..., pathlib.Path],
    rules: dict[str, Any],
    call: dict[str, Any],
    message: str,
    event: str | None,
    make_package: Callable[..., pathlib.Path],
    serve_keys: ServeKeys,
    tmp_path: pathlib.Path,
) -> None:
    package = build(make_package, serve_keys)
    sink = ListSink()
    admission = _admission(serve_keys, tmp_path, sink, **rules)
    with pytest.raises(AdapterRefusedError) as info:
        admission.admit(package, **call)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"package {package} refused: ")
    assert message in text
    assert info.value.exit_code != 0
    if event is not None:
        assert sink.events[-1].event_id == event
    else:  # a modified header fails parsing or a signature: refused before any decryption
        assert sink.events[-1].event_id in {"tssp.signature.invalid", "tssp.format.invalid"}
        assert not any(e.event_id == "tssp.unpack.accepted" for e in sink.events)


def test_a_rollback_to_an_older_version_is_refused(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    admission = _admission(serve_keys, tmp_path)
    admission.admit(make_package(version="1.1.0"))
    with pytest.raises(AdapterRefusedError, match=r"refused: .*1\.0\.0"):
        admission.admit(make_package(version="1.0.0"))


def test_a_package_without_a_lora_adapter_is_refused(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    other = tmp_path / "not-an-adapter"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterRefusedError, match="holds no PEFT LoRA adapter"):
        _admission(serve_keys, tmp_path).admit(make_package(other))


def test_no_trusted_signer_given_is_an_error(serve_keys: ServeKeys, tmp_path: pathlib.Path) -> None:
    with pytest.raises(AdapterRefusedError, match="--trust"):
        _admission(serve_keys, tmp_path, trust=[])


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def _admitted(
    make_package: Callable[..., pathlib.Path], keys: ServeKeys, tmp_path: pathlib.Path, **kw: Any
) -> AdmittedPackage:
    return _admission(keys, tmp_path, state=None).admit(make_package(**kw))


def test_source_serves_name_and_name_at_version_until_expiry(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    clock = Clock()
    source = PackageSource(tenant="acme", base_model=BASE, clock=clock)
    admitted = _admitted(make_package, serve_keys, tmp_path, expires_in=dt.timedelta(hours=1))
    source.add(admitted)
    plain = source.resolve(ACME, "clinical")
    versioned = source.resolve(ACME, "clinical@1.0.0")
    assert plain is not None and plain == versioned and plain.tenant == "acme"
    assert source.resolve(ACME, "clinical@2.0.0") is None
    assert source.resolve(ACME, "radiology") is None
    with pytest.raises(ModelNotFoundError) as other:
        source.resolve(GLOBEX, "clinical")
    assert not isinstance(other.value, AdapterUnavailableError)
    assert {m.id for m in source.list_models(ACME)} == {"clinical", "clinical@1.0.0"}
    assert source.list_models(GLOBEX) == []
    adapter = source.fetch(plain)
    assert adapter.files == admitted.files and adapter.adapter_id == plain.adapter_id
    source.check(plain)

    clock.now += dt.timedelta(hours=1)
    for call in (
        lambda: source.resolve(ACME, "clinical"),
        lambda: source.check(plain),
        lambda: source.fetch(plain),
    ):
        with pytest.raises(AdapterUnavailableError, match="expired at"):
            call()
    assert source.list_models(ACME) == []


def test_source_replacement_and_removal_invalidate_the_old_adapter(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    source = PackageSource(tenant="acme", base_model=BASE)
    source.add(_admitted(make_package, serve_keys, tmp_path))
    old = source.resolve(ACME, "clinical")
    assert old is not None
    replaced = source.add(_admitted(make_package, serve_keys, tmp_path, version="1.1.0"))
    assert replaced is not None and replaced.version == "1.0.0"
    new = source.resolve(ACME, "clinical")
    assert new is not None and new.adapter_id != old.adapter_id
    assert source.resolve(ACME, "clinical@1.0.0") is None
    with pytest.raises(ModelNotFoundError):
        source.check(old)
    removed = source.remove("clinical@1.1.0")
    assert removed is not None and removed.version == "1.1.0"
    assert source.resolve(ACME, "clinical") is None
    with pytest.raises(ModelNotFoundError):
        source.fetch(new)
    assert source.remove("clinical") is None


def test_the_policy_is_evaluated_in_the_admitting_thread(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    """The Rego engine may not cross threads (regorus panics): the serving process admits in a
    worker thread, so the policy compiled at start must not be the one evaluated there."""
    from concurrent.futures import ThreadPoolExecutor

    allow_all = 'package tensafe.tssp\nimport rego.v1\ndeny contains msg if { false; msg := "" }\n'
    admission = _admission(serve_keys, tmp_path, policy=allow_all)
    package = make_package()
    with ThreadPoolExecutor(1) as pool:
        admitted = pool.submit(admission.admit, package).result()
    assert admitted.name == "clinical"
    with pytest.raises(AdapterRefusedError, match="admission policy <policy> is not usable"):
        _admission(serve_keys, tmp_path, policy="package tensafe.tssp\ndeny := [")


def test_revocation_list_format_and_reasons(
    make_package: Callable[..., pathlib.Path], serve_keys: ServeKeys, tmp_path: pathlib.Path
) -> None:
    from tensafe.serving.packages import RevocationList

    admitted = _admitted(make_package, serve_keys, tmp_path)
    assert RevocationList().reason(admitted) is None
    by_package = RevocationList.parse(f"# withdrawn\n\npackage:{admitted.header_sha256.upper()}  # leaked\n")
    assert by_package.reason(admitted) == "its package was revoked"
    by_signer = RevocationList.parse(f"signer:{serve_keys.publisher.key_id}\n")
    assert by_signer.reason(admitted) == f"its signer {serve_keys.publisher.key_id} was revoked"
    assert RevocationList.parse(f"signer:{serve_keys.stranger.key_id}\n").reason(admitted) is None
    for bad in ("package:abc", "signer:" + "g" * 32, "key:" + "0" * 64, "package " + "0" * 64):
        with pytest.raises(AdapterRefusedError, match="line 1"):
            RevocationList.parse(bad)
    source = PackageSource(tenant="acme", base_model=BASE)
    source.add(admitted)
    ref = source.resolve(ACME, "clinical")
    assert ref is not None
    source.set_revoked(by_signer)
    with pytest.raises(AdapterUnavailableError, match="revocation list"):
        source.resolve(ACME, "clinical")
    with pytest.raises(AdapterUnavailableError):
        source.check(ref)
    assert source.list_models(ACME) == []
