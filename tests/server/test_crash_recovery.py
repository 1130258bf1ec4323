"""``kill -9`` of ``tensafe server`` mid-run: no completed optim_step is lost, no future hangs.

The server runs as a real subprocess (``tensafe server``) on a loopback port; the official
``tinker`` SDK drives it, the process is killed with SIGKILL and restarted on the same
port, and the same SDK clients carry on.
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL
from tensafe.db import create_engine_from_url, make_session_factory, upgrade
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.tenants import create_api_key, create_tenant

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server:
    def __init__(self, env: dict[str, str], port: int, log: pathlib.Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-c", "import sys; from tensafe.cli.main import main; sys.exit(main())"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*argv, "server", "--port", str(self.port)], env=self.env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def _server_env(
    url: str, tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> tuple[dict[str, str], str, Any, Any]:
    """Migrate ``url``, create tenant ``acme`` with an API key; return (env, key, sessions, engine)."""
    upgrade(url)
    engine = create_engine_from_url(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        create_tenant(s, "acme")
        key, _ = create_api_key(s, "acme")
    env = os.environ | {
        "DATABASE_URL": url,
        "TS_DATA_DIR": str(tmp_path / "data"),
        "TS_SERVER_MODELS": f"{TINY_MODEL}={tiny_model_dir}",
        "TS_SERVER_LEASE_S": "2",
        "TS_SERVER_POLL_INTERVAL_S": "0.05",
        "TS_SERVER_LONG_POLL_S": "5",
        "TS_DP_TARGET_EPSILON": "50",
        "TS_DP_DELTA": "1e-3",
        "TS_DP_CLIP_NORM": "10",
        "TS_DP_DATASET_SIZE": "64",
        "TS_DP_EXPECTED_BATCH_SIZE": "8",
        "TS_DP_MAX_STEPS": "40",
    }
    return env, key, sessions, engine


@pytest.fixture
def server(tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path) -> Iterator[tuple[_Server, str, Any]]:
    env, key, sessions, engine = _server_env(f"sqlite:///{tmp_path / 'crash.db'}", tmp_path, tiny_model_dir)
    srv = _Server(env, _port(), tmp_path / "server.log")
    srv.start()
    try:
        yield srv, key, sessions
    finally:
        srv.stop()
        engine.dispose()


def _batch() -> list[Any]:
    tokens = [1, 17, 23, 42, 99, 7]
    return [
        tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5},
        )
    ]


def _probe(training: Any) -> np.ndarray:
    out = training.forward(_batch(), "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].to_numpy())


def _step_of(sessions: Any, model_id: str) -> int:
    with sessions() as s:
        row = s.get(TrainingModel, model_id)
        assert row is not None
        return int(row.step or 0)


@pytest.mark.slow
def test_kill9_loses_no_completed_step_and_no_future_hangs(server: tuple[_Server, str, Any]) -> None:
    srv, key, sessions = server
    service = tinker.ServiceClient(base_url=srv.url, api_key=key)
    adam = tinker.types.AdamParams(learning_rate=5e-2)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        for _ in range(3):
            training.forward_backward(_batch(), "cross_entropy").result()
            training.optim_step(adam).result()
        before = _probe(training)
        assert _step_of(sessions, training.model_id) == 3

        # 1. Crash between requests: the restarted server reloads step 3, bit for bit.
        srv.kill9()
        srv.start()
        np.testing.assert_array_equal(_probe(training), before)
        assert _step_of(sessions, training.model_id) == 3

        # 2. Crash with requests in flight: each future completes or fails; none hangs.
        fb = training.forward_backward(_batch(), "cross_entropy")
        opt = training.optim_step(adam)
        time.sleep(0.3)
        srv.kill9()
        srv.start()
        outcomes: list[str] = []
        for fut in (fb, opt):
            try:
                fut.result(timeout=120)
                outcomes.append("ok")
            except tinker.RequestFailedError as exc:
                outcomes.append(str(exc))
        step = _step_of(sessions, training.model_id)
        # A completed optim_step is counted; a failed one is not.
        assert step == (4 if outcomes[1] == "ok" else 3), outcomes
        if outcomes[1] != "ok":
            assert "server stopped" in outcomes[1] or "lost their accumulated gradients" in outcomes[1]

        # 3. The run continues where it stands.
        training.forward_backward(_batch(), "cross_entropy").result()
        metrics = training.optim_step(adam).result().metrics
        assert metrics is not None and metrics["dp_epsilon:max"] > 0
        assert _step_of(sessions, training.model_id) == step + 1
    finally:
        service.close("success").result()
    with sessions() as s:
        states = {r.state for r in s.execute(select(FutureRow)).scalars()}
    assert states <= {"complete", "failed"}
