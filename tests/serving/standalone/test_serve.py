"""``tensafe serve`` for real, and ``tensafe chat`` against it.

* ``test_serve_and_chat_end_to_end`` starts the command in a subprocess on a loopback port with a
  package packed from a real PEFT adapter of the tiny model; the answers are compared with
  ``transformers`` + ``peft`` on the same adapter (an independent reference); the tenant's keys
  authenticate, a revoked key and another tenant's key do not; ``tensafe chat`` holds one
  exchange through standard input; the audit chain records the decisions and never a prompt.
* ``test_a_refused_package_stops_the_start`` runs the command in process for every refusal:
  one line on standard error, a non-zero exit, the refusal in the tenant's audit chain, and
  nothing listening.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from serving.standalone.conftest import BASE, ServeKeys
from tensafe.audit.models import AuditRecordRow
from tensafe.db import create_engine_from_url, make_session_factory, upgrade
from tensafe.server.tenants import create_api_key, create_tenant, revoke_api_key

PROMPT = "Summarise the discharge note of patient 4711"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServeEnv:
    """A migrated database with two tenants and their keys, key files and environment."""

    root: pathlib.Path
    url: str
    acme_key: str
    acme_revoked: str
    globex_key: str
    env: dict[str, str]
    files: dict[str, pathlib.Path]

    def records(self, tenant: str) -> list[AuditRecordRow]:
        engine = create_engine_from_url(self.url)
        try:
            with make_session_factory(engine)() as session:
                rows = session.execute(
                    select(AuditRecordRow)
                    .where(AuditRecordRow.tenant_id == tenant)
                    .order_by(AuditRecordRow.seq)
                )
                return list(rows.scalars())
        finally:
            engine.dispose()


@pytest.fixture
def serve_env(tmp_path: pathlib.Path, serve_keys: ServeKeys, monkeypatch: pytest.MonkeyPatch) -> ServeEnv:
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    upgrade(url)
    engine = create_engine_from_url(url)
    with make_session_factory(engine).begin() as session:
        create_tenant(session, "acme")
        create_tenant(session, "globex")
        acme_key, _ = create_api_key(session, "acme")
        acme_revoked, info = create_api_key(session, "acme")
        revoke_api_key(session, info.key_id)
        globex_key, _ = create_api_key(session, "globex")
    engine.dispose()
    files = {
        "trust": tmp_path / "publisher.pub",
        "stranger": tmp_path / "stranger.pub",
        "recipient": tmp_path / "recipient.key",
        "other_recipient": tmp_path / "other-recipient.key",
        "key": tmp_path / "acme.key",
    }
    files["trust"].write_bytes(serve_keys.publisher.verifying_key().public_bytes())
    files["stranger"].write_bytes(serve_keys.stranger.verifying_key().public_bytes())
    files["recipient"].write_bytes(serve_keys.recipient.private_bytes(passphrase=None))
    files["other_recipient"].write_bytes(serve_keys.other_recipient.private_bytes(passphrase=None))
    files["key"].write_text(acme_key + "\n")
    env = {"DATABASE_URL": url, "TS_DATA_DIR": str(tmp_path / "ts-data")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return ServeEnv(tmp_path, url, acme_key, acme_revoked, globex_key, env, files)


def serve_argv(
    env: ServeEnv, model_dir: pathlib.Path, packages: list[pathlib.Path], port: int, *extra: str
) -> list[str]:
    argv = ["serve", "--tenant", "acme", "--recipient-key", str(env.files["recipient"])]
    argv += ["--trust", str(env.files["trust"]), "--base-model", f"{BASE}={model_dir}"]
    argv += ["--port", str(port), "--state", str(env.root / "tssp-state.json")]
    for package in packages:
        argv += ["--package", str(package)]
    return argv + list(extra)


class Process:
    """``tensafe serve`` in a subprocess; ``ready()`` waits for its "listening" line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tensafe.cli.main", *argv],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self._listening.set()

    def ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("tensafe serve did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(10)
        return code


@pytest.fixture
def start_serve() -> Iterator[Callable[[list[str], dict[str, str]], Process]]:
    started: list[Process] = []

    def _start(argv: list[str], env: dict[str, str]) -> Process:
        process = Process(argv, env)
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(30)


def reference_greedy(
    model_dir: pathlib.Path, adapter_dir: pathlib.Path, prompt_ids: list[int], n: int
) -> list[int]:
    """Greedy tokens of transformers + PEFT with the adapter (the independent reference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.slow
def test_serve_and_chat_end_to_end(
    serve_env: ServeEnv,
    serving_model_dir: pathlib.Path,
    adapter_dir: pathlib.Path,
    make_package: Callable[..., pathlib.Path],
    start_serve: Callable[[list[str], dict[str, str]], Process],
) -> None:
    from transformers import AutoTokenizer

    port = free_port()
    package = make_package()
    process = start_serve(serve_argv(serve_env, serving_model_dir, [package], port), serve_env.env)
    process.ready()
    base_url = f"http://127.0.0.1:{port}/v1"
    acme = {"Authorization": f"Bearer {serve_env.acme_key}"}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        models = client.get("/models", headers=acme)
        assert models.status_code == 200
        assert {m["id"] for m in models.json()["data"]} == {BASE, "clinical", "clinical@1.0.0"}

        # The served adapter is the package's: greedy tokens equal transformers + PEFT.
        tokenizer = AutoTokenizer.from_pretrained(str(serving_model_dir))
        prompt_ids = tokenizer.encode(PROMPT)
        expected = reference_greedy(serving_model_dir, adapter_dir, prompt_ids, 8)
        body = {"prompt": prompt_ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        for model in ("clinical", "clinical@1.0.0"):
            answer = client.post("/completions", headers=acme, json={**body, "model": model})
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == tokenizer.decode(expected)
        base_answer = client.post("/completions", headers=acme, json={**body, "model": BASE})
        assert base_answer.json()["choices"][0]["text"] != tokenizer.decode(expected)

        # Authentication: the tenant's key only; OpenAI's error shape.
        for headers in (
            {},
            {"Authorization": f"Bearer {serve_env.acme_revoked}"},
            {"Authorization": f"Bearer {serve_env.globex_key}"},
            {"X-API-Key": serve_env.globex_key},
        ):
            refused = client.post("/completions", headers=headers, json={**body, "model": "clinical"})
            assert refused.status_code == 401
            assert set(refused.json()["error"]) >= {"message", "type", "param", "code"}
        revoked = client.get("/models", headers={"Authorization": f"Bearer {serve_env.acme_revoked}"})
        assert "revoked" in revoked.json()["error"]["message"]
        unknown = client.post("/completions", headers=acme, json={**body, "model": "clinical@2.0.0"})
        assert unknown.status_code == 404
        # No admin token was given: the admin routes are closed, also to the tenant's key.
        closed = client.post(
            f"http://127.0.0.1:{port}/admin/adapters", headers=acme, json={"path": str(package)}
        )
        assert closed.status_code == 401 and "disabled" in closed.json()["error"]["message"]

        chat_reference = client.post(
            "/chat/completions",
            headers=acme,
            json={
                "model": "clinical",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 6,
                "temperature": 0,
            },
        ).json()["choices"][0]["message"]["content"]

    # tensafe chat: one exchange through standard input, streamed.
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensafe.cli.main",
            "chat",
            "--model",
            "clinical",
            "--base-url",
            base_url,
            "--api-key-file",
            str(serve_env.files["key"]),
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ],
        input=PROMPT + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TENSAFE_API_KEY": ""},
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == chat_reference + "\n"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensafe.cli.main",
            "chat",
            "--model",
            "radiology",
            "--base-url",
            base_url,
            "--api-key-file",
            str(serve_env.files["key"]),
        ],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert bad.stderr.startswith("tensafe: error: the server answered 404") and bad.stderr.count("\n") == 1

    assert process.stop() == 0
    records = serve_env.records("acme")
    actions = [r.action for r in records]
    assert "tssp.unpack.accepted" in actions and "serving.adapter.loaded" in actions
    unloaded = [json.loads(r.details) for r in records if r.action == "serving.adapter.unloaded"]
    assert unloaded and unloaded[-1]["reason"] == "shutdown"
    dump = json.dumps([[r.actor, r.action, r.resource, r.details] for r in records])
    assert PROMPT not in dump and "discharge" not in dump and serve_env.acme_key not in dump
    assert not serve_env.records("globex")


def _past_package(make_package: Callable[..., pathlib.Path]) -> pathlib.Path:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    return make_package(now=created, expires_in=dt.timedelta(days=1))


def _flip_tail(path: pathlib.Path) -> pathlib.Path:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    return path


REFUSALS: list[Any] = [
    pytest.param(
        lambda mk, env: (_flip_tail(mk()), []), "failed to decrypt", "tssp.decrypt.failed", id="tampered"
    ),
    pytest.param(lambda mk, env: (_past_package(mk), []), "expired", "tssp.package.expired", id="expired"),
    pytest.param(
        lambda mk, env: (mk(), ["--trust", str(env.files["stranger"])]), None, None, id="untrusted-signer"
    ),
    pytest.param(
        lambda mk, env: (mk(), ["--recipient-key", str(env.files["other_recipient"])]),
        "not a recipient",
        "tssp.recipient.unknown",
        id="wrong-recipient-key",
    ),
    pytest.param(
        lambda mk, env: (mk(), ["--policy", str(env.root / "deny.rego")]),
        "policy denied the package: clinical adapters are not admitted here",
        "tssp.policy.denied",
        id="policy-denial",
    ),
    pytest.param(
        lambda mk, env: (mk(base_model_id="HuggingFaceTB/SmolLM2-360M-Instruct"), []),
        "is for base model 'HuggingFaceTB/SmolLM2-360M-Instruct'",
        "serving.adapter.refused",
        id="wrong-base-model",
    ),
    pytest.param(
        lambda mk, env: (mk(base_model_sha256="0" * 64), []),
        "pins base model weights",
        "serving.adapter.refused",
        id="wrong-base-weights",
    ),
]


@pytest.mark.parametrize(("build", "message", "event"), REFUSALS)
def test_a_refused_package_stops_the_start(
    build: Callable[..., tuple[pathlib.Path, list[str]]],
    message: str | None,
    event: str | None,
    serve_env: ServeEnv,
    serving_model_dir: pathlib.Path,
    make_package: Callable[..., pathlib.Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tensafe.cli.main import main

    (serve_env.root / "deny.rego").write_text(
        'package tensafe.tssp\nimport rego.v1\n\ndeny contains "clinical adapters are not admitted here" '
        'if input.manifest.name == "clinical"\n'
    )
    package, extra = build(make_package, serve_env)
    port = free_port()
    argv = serve_argv(serve_env, serving_model_dir, [package], port)
    for flag in ("--trust", "--recipient-key"):  # a replacement, not a second value
        if flag in extra and flag in argv:
            at = argv.index(flag)
            del argv[at : at + 2]
    code = main([*argv, *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tensafe: error:")]
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tensafe: error: package {package} refused: ")
    if message is None:
        assert "trust store" in lines[0]
        event = "tssp.signer.untrusted"
    else:
        assert message in lines[0]
    assert event in [r.action for r in serve_env.records("acme")]
    with socket.socket() as s:  # nothing listens
        assert s.connect_ex(("127.0.0.1", port)) != 0
