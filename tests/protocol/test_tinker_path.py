"""``TinkerPath``: the grammar of ``tinker://<run>/<kind>/<name>``, checked against independent oracles.

The oracles are the server's parser as it stood before ``TinkerPath`` existed (its regular
expression copied here, so that a grammar change shows up as a failure) and the official
``tinker`` SDK's ``ParsedCheckpointTinkerPath`` for the strings both accept.
"""

from __future__ import annotations

import re

import pytest
import tinker
from hypothesis import example, given
from hypothesis import strategies as st

from tensafe.errors import TenSafeError
from tensafe.protocol import CHECKPOINT_KINDS, InvalidTinkerPathError, ProtocolError, TinkerPath

# The server's grammar before TinkerPath (server/ops.py, parse_tinker_path).
_OLD_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,199}")
_OLD_KINDS = ("weights", "sampler_weights", "external_weights")


def _old_server_parse(path: str) -> tuple[str, str, str] | None:
    if not path.startswith("tinker://"):
        return None
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or parts[1] not in _OLD_KINDS or not all(_OLD_PART.fullmatch(x) for x in parts):
        return None
    return parts[0], parts[1], parts[2]


_IDENT_CHARS = "abcXYZ019:._-"
idents = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("aZ09"),
    st.text(alphabet=_IDENT_CHARS, max_size=199),
)
paths = st.builds(TinkerPath, run_id=idents, kind=st.sampled_from(CHECKPOINT_KINDS), name=idents)
# Strings near the grammar: the pieces of valid paths plus the characters that break them.
near_misses = st.lists(
    st.sampled_from(
        [
            "tinker://",
            "tinker:/",
            "http://",
            "/",
            "//",
            "weights",
            "sampler_weights",
            "external_weights",
            "archives",
            "a",
            "s:train:0",
            ".",
            "..",
            "-x",
            " ",
            "\n",
            "\t",
            "é",
            "x" * 201,
            "",
            "?",
            "#",
            "%2F",
        ]
    ),
    max_size=8,
).map("".join)


@given(paths)
def test_format_then_parse_is_the_identity(path: TinkerPath) -> None:
    text = str(path)
    assert text == path.format() == f"tinker://{path.run_id}/{path.kind}/{path.name}"
    assert TinkerPath.parse(text) == path
    assert TinkerPath.from_checkpoint_id(path.run_id, path.checkpoint_id) == path


@given(st.one_of(near_misses, st.text(max_size=60), paths.map(str)))
@example("tinker://s:train:0/weights/final\n")
@example("tinker://s:train:0/weights/.")
@example("tinker://s:train:0/weights/..")
@example("tinker://s:train:0/weights/" + "x" * 201)
@example("tinker://s:train:0/archives/x")
@example("tinker://s:train:0/weights")
@example("tinker://s/weights/a/b")
@example("tinker:///weights/a")
@example("TINKER://s/weights/a")
def test_parse_accepts_exactly_the_servers_grammar(text: str) -> None:
    expected = _old_server_parse(text)
    if expected is None:
        with pytest.raises(InvalidTinkerPathError, match=r"tinker://"):
            TinkerPath.parse(text)
        return
    path = TinkerPath.parse(text)
    assert (path.run_id, path.kind, path.name) == expected
    assert str(path) == text
    # The official SDK splits every path the server accepts the same way.
    official = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(text)
    assert (official.training_run_id, official.checkpoint_id) == (path.run_id, path.checkpoint_id)
    assert official.checkpoint_type == path.checkpoint_type


def test_the_error_is_the_protocols_and_a_value_error() -> None:
    with pytest.raises(InvalidTinkerPathError) as info:
        TinkerPath.parse("s:train:0/weights/final")
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value, ValueError)  # SDK callers catch ValueError, as with the official SDK
    assert isinstance(info.value, TenSafeError)
    assert "is not a tinker:// path" in str(info.value)
    with pytest.raises(InvalidTinkerPathError, match="must look like tinker://<training_run_id>/"):
        TinkerPath.parse("tinker://s:train:0/archives/x")


def test_messages_never_echo_more_than_80_characters() -> None:
    secretish = "tinker://" + "A" * 500
    with pytest.raises(InvalidTinkerPathError) as info:
        TinkerPath.parse(secretish)
    assert "A" * 81 not in str(info.value)


@pytest.mark.parametrize(
    ("run_id", "kind", "name"),
    [
        ("", "weights", "a"),
        ("r", "weights", ""),
        ("r/x", "weights", "a"),
        ("r", "weights", "a/b"),
        ("r", "archives", "a"),
        ("r", "weights", ".."),
        ("r", "weights", "a b"),
        ("r", "weights", "a\n"),
    ],
)
def test_the_constructor_refuses_parts_that_would_not_parse(run_id: str, kind: str, name: str) -> None:
    with pytest.raises(InvalidTinkerPathError):
        TinkerPath(run_id=run_id, kind=kind, name=name)  # type: ignore[arg-type]


def test_checkpoint_ids_and_types() -> None:
    cases = {
        "tinker://s:train:0/weights/final": ("weights/final", "training"),
        "tinker://s:train:0/sampler_weights/x.1": ("sampler_weights/x.1", "sampler"),
        "tinker://s:train:0/external_weights/e": ("external_weights/e", "external"),
    }
    for text, (checkpoint_id, checkpoint_type) in cases.items():
        path = TinkerPath.parse(text)
        assert (path.checkpoint_id, path.checkpoint_type) == (checkpoint_id, checkpoint_type)
    for bad in ("weights", "weights/a/b", "archives/x", "weights/..", ""):
        with pytest.raises(InvalidTinkerPathError, match="checkpoint id"):
            TinkerPath.from_checkpoint_id("s:train:0", bad)


def test_paths_are_frozen_and_hashable() -> None:
    path = TinkerPath.parse("tinker://r/weights/a")
    with pytest.raises(AttributeError):
        path.name = "b"  # type: ignore[misc]
    assert {path, TinkerPath(run_id="r", kind="weights", name="a")} == {path}
