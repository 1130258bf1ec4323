"""``tensafe server`` as an operator runs it: a subprocess on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tensafe.db import upgrade


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tensafe(*argv: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from tensafe.cli.main import main; sys.exit(main())", *argv]


@pytest.mark.slow
def test_tensafe_server_serves_and_refuses_an_unmigrated_database(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = os.environ | {
        "DATABASE_URL": f"sqlite:///{tmp_path / 't.db'}",
        "TS_DATA_DIR": str(tmp_path / "data"),
        "TS_SERVER_MODELS": f"tiny={tiny_model_dir}",
    }
    # Production never migrates implicitly (in development the embedded SQLite file would be).
    production = env | {"TS_ENVIRONMENT": "production"}
    refused = subprocess.run(_tensafe("server"), env=production, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "tensafe db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    upgrade(env["DATABASE_URL"])
    out = subprocess.run(
        _tensafe("admin", "create-tenant", "acme"), env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        _tensafe("admin", "create-api-key", "--tenant", "acme"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    key = out.stdout.strip().splitlines()[-1]
    port = _port()
    proc = subprocess.Popen(
        _tensafe("server", "--port", str(port)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        caps = httpx.get(base + "/api/v1/get_server_capabilities", headers={"X-API-Key": key}).json()
        assert caps["supported_models"][0]["model_name"] == "tiny"
        assert httpx.get(base + "/api/v1/training_runs").status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)
