"""``tensafe chat`` refuses to send a key where it should not, with one line (no server needed).

The exchange with a real server is in ``test_serve.py`` (``test_serve_and_chat_end_to_end``).
"""

from __future__ import annotations

import pathlib

import pytest

from tensafe.cli.main import main

KEY = "tml-" + "A" * 43


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tensafe: error:")]
    assert len(lines) == 1
    return lines[0]


def test_plain_http_to_a_remote_host_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENSAFE_API_KEY", KEY)
    monkeypatch.delenv("TENSAFE_ALLOW_INSECURE_HTTP", raising=False)
    assert main(["chat", "--model", "clinical", "--base-url", "http://10.11.12.13:8001/v1"]) != 0
    assert "refusing plain HTTP" in _error(capsys)


def test_a_missing_or_bad_key_is_refused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TENSAFE_API_KEY", raising=False)
    assert main(["chat", "--model", "clinical"]) != 0
    assert "no API key" in _error(capsys)
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    assert main(["chat", "--model", "clinical", "--api-key-file", str(empty)]) != 0
    assert "is empty" in _error(capsys)
    wrong = tmp_path / "wrong.key"
    wrong.write_text("sk-not-a-tensafe-key\n")
    assert main(["chat", "--model", "clinical", "--api-key-file", str(wrong)]) != 0
    assert "tml-" in _error(capsys)
    assert main(["chat", "--model", "clinical", "--api-key-file", str(tmp_path / "missing")]) != 0
    assert "cannot read" in _error(capsys)


def test_an_unreachable_server_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TENSAFE_API_KEY", KEY)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\n"))
    assert main(["chat", "--model", "clinical", "--base-url", f"http://127.0.0.1:{port}/v1"]) != 0
    assert "cannot reach" in _error(capsys)
