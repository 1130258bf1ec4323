"""Fuzzing the TSSP parser with Hypothesis: untrusted input raises PackageError and nothing else.

A coverage-guided harness for atheris lives in ``fuzz_tssp_atheris.py`` next to this file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from package._forge import split
from package.tssp_helpers import Keys
from tensafe._canonical import canonical_json
from tensafe.package import PackageError, PackageFormatError, inspect, verify
from tensafe.package._format import read_header
from tensafe.package._manifest import parse_manifest

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _parse_only(data: bytes) -> None:
    try:
        read_header(io.BytesIO(data), file_size=len(data))
    except PackageError:
        pass


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _parse_only(data)
    _parse_only(b"TSSP\x01\x00" + data)


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> bytes:
    from package.tssp_helpers import certificate, make_adapter
    from tensafe.package import pack

    root = tmp_path_factory.mktemp("seed")
    out = root / "seed.tssp"
    pack(
        make_adapter(root / "a", certificate=certificate()),
        out,
        name="seed",
        version="1.0.0",
        signing_keys=[keys.signers[0]],
        recipients=[keys.recipients[0].public_key()],
        chunk_size=1024,
    )
    return out.read_bytes()


mutation = st.tuples(
    st.sampled_from(["overwrite", "insert", "delete", "truncate"]),
    st.integers(min_value=0),
    st.binary(min_size=1, max_size=16),
)


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, chunk in ops:
        pos %= len(buf) + 1
        if op == "overwrite":
            buf[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            buf[pos:pos] = chunk
        elif op == "delete":
            del buf[pos : pos + len(chunk)]
        else:
            del buf[pos:]
        if not buf:
            break
    return bytes(buf)


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_packages(tmp_path: Path, keys: Keys, seed: bytes, ops: list[tuple[str, int, bytes]]) -> None:
    data = _mutate(seed, ops)
    pkg = tmp_path / "m.tssp"
    pkg.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inspect(pkg)
        except PackageError:
            pass
        try:
            verify(pkg, trust=[keys.signers[0].verifying_key()], state=None)
        except PackageError:
            pass
        else:
            # Without a recipient key only the header is authenticated; the encrypted chunks are
            # authenticated by unpack (tested in test_tssp_tamper.py).
            head = split(seed).header.payload_offset + 3
            assert len(data) == len(seed) and data[:head] == seed[:head], "a modified header verified"


json_leaf = st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | st.text(max_size=20)
json_doc = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
    max_leaves=30,
)


@SETTINGS
@given(st.data())
def test_mutated_manifests(seed: bytes, data: st.DataObject) -> None:
    """Replace or delete one manifest member (at any depth) with arbitrary JSON."""
    parts = split(seed)
    doc: Any = parts.header.manifest.document
    target = doc
    path = []
    while True:
        if isinstance(target, dict) and target:
            key = data.draw(st.sampled_from(sorted(target)))
        elif isinstance(target, list) and target:
            key = data.draw(st.integers(0, len(target) - 1))
        else:
            break
        path.append(key)
        if not data.draw(st.booleans()):
            break
        target = target[key]
    new = data.draw(json_doc)

    def rebuild(node: Any, keys: list[Any]) -> Any:
        if not keys:
            return new
        copy = dict(node) if isinstance(node, dict) else list(node)
        copy[keys[0]] = rebuild(node[keys[0]], keys[1:])
        return copy

    mutated = rebuild(doc, path)
    try:
        parse_manifest(mutated)
    except PackageFormatError:
        pass
    try:
        encoded = canonical_json(mutated, allow_floats=True)
    except ValueError:
        return
    blob = parts.__class__(**{**parts.__dict__, "manifest": encoded}).encode()
    _parse_only(blob)


@SETTINGS
@given(json_doc)
def test_arbitrary_manifest_documents(doc: Any) -> None:
    try:
        parse_manifest(doc)
    except PackageFormatError:
        pass


def test_mutation_helper_changes_bytes(seed: bytes, packer: Callable[..., Path]) -> None:
    assert _mutate(seed, [("overwrite", 5, b"\xff")]) != seed
