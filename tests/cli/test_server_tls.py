"""``tensafe server --tls-cert/--tls-key``: TLS 1.3 terminated by the server, verified by the SDKs.

One server runs for the module, as an operator starts it on a new machine: a subprocess on a
fresh SQLite file in development mode (so it also shows the first run: no ``tensafe db
upgrade``), with a certificate for 127.0.0.1 issued by a private CA made here with
``cryptography``. The attacks: a client that does not trust that CA (a man in the middle
presenting this certificate to it is indistinguishable from a forged one), a client that offers
only TLS 1.2, and flags that would silently serve plain HTTP.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cli_helpers import clean_env, tensafe_argv
from tls_helpers import TlsFiles, make_tls_files

from tensafe.cli.main import main
from tensafe.client import APIConnectionError, ClientConfigurationError, RestClient, ServiceClient
from tensafe.db import current_revision, head_revision

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TlsServer:
    url: str
    port: int
    key: str
    tls: TlsFiles
    database_url: str
    log: Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("tls-server")
    tls = make_tls_files(root / "tls")
    database_url = f"sqlite:///{root / 'tensafe.db'}"
    env = clean_env(root, DATABASE_URL=database_url, TS_SERVER_MODELS="tiny=/nonexistent/tiny")
    port = _port()
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            tensafe_argv(
                "server",
                "--port",
                str(port),
                "--no-worker",
                "--tls-cert",
                str(tls.cert),
                "--tls-key",
                str(tls.key),
            ),
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(tls.ca))
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", verify=trust).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server did not start: " + log.read_text()
            time.sleep(0.3)
        # The server runs; `tensafe admin` works on the same fresh file without `db upgrade` too.
        created = _run(tensafe_argv("admin", "create-tenant", "acme"), env, root)
        assert created.returncode == 0, created.stderr
        issued = _run(tensafe_argv("admin", "create-api-key", "--tenant", "acme"), env, root)
        assert issued.returncode == 0, issued.stderr
        key = issued.stdout.strip().splitlines()[-1]
        yield TlsServer(url=url, port=port, key=key, tls=tls, database_url=database_url, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:  # uvicorn waits for keep-alive connections of the SDKs
            proc.kill()
            proc.wait(15)


def test_the_server_created_its_schema_on_a_fresh_sqlite_file(tls_server: TlsServer) -> None:
    assert current_revision(tls_server.database_url) == head_revision()
    assert "created the schema of" in tls_server.log.read_text()


def test_the_handshake_is_tls_1_3_with_the_configured_certificate(tls_server: TlsServer) -> None:
    context = ssl.create_default_context(cafile=str(tls_server.tls.ca))
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            assert conn.version() == "TLSv1.3"
            peer = conn.getpeercert()
    assert peer is not None and ("IP Address", "127.0.0.1") in peer["subjectAltName"]


def test_a_tls_1_2_only_client_is_refused(tls_server: TlsServer) -> None:
    context = ssl.create_default_context(cafile=str(tls_server.tls.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                pass
    # The same client through httpx fails too (no downgrade to anything the server accepts).
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/readyz", verify=context)


def test_plain_http_to_the_tls_port_gets_nothing(tls_server: TlsServer) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/readyz", timeout=10)


def test_the_sdk_connects_when_given_the_ca(tls_server: TlsServer) -> None:
    with ServiceClient(
        base_url=tls_server.url, api_key=tls_server.key, ca_bundle=tls_server.tls.ca
    ) as service:
        caps = service.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == ["tiny"]
        with service.create_rest_client() as rest:
            assert rest.list_training_runs().result().training_runs == []


def test_the_sdk_takes_the_ca_from_tensafe_ca_bundle(
    tls_server: TlsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSAFE_CA_BUNDLE", str(tls_server.tls.ca))
    with RestClient(base_url=tls_server.url, api_key=tls_server.key) as rest:
        assert rest.list_training_runs().result().training_runs == []


@pytest.mark.parametrize("trust", ["default", "other_ca"])
def test_the_sdk_fails_closed_without_the_ca(
    tls_server: TlsServer, monkeypatch: pytest.MonkeyPatch, trust: str
) -> None:
    for name in ("TENSAFE_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    ca_bundle = tls_server.tls.other_ca if trust == "other_ca" else None
    client = RestClient(base_url=tls_server.url, api_key=tls_server.key, ca_bundle=ca_bundle)
    started = time.monotonic()
    with client, pytest.raises(APIConnectionError, match="does not verify") as caught:
        client.get_server_capabilities().result()
    # Not retried: a certificate that does not verify is not a transient network error.
    assert time.monotonic() - started < 5
    assert "TENSAFE_CA_BUNDLE" in str(caught.value) and tls_server.key not in str(caught.value)


def test_an_unreadable_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigurationError, match="cannot load the CA bundle"):
        ServiceClient(
            base_url="https://127.0.0.1:1", api_key="tml-" + "x" * 43, ca_bundle=tmp_path / "nope.pem"
        )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ClientConfigurationError, match="cannot load the CA bundle"):
        RestClient(base_url="https://127.0.0.1:1", api_key="tml-" + "x" * 43, ca_bundle=garbage)


def test_the_official_tinker_sdk_trusts_the_ca_through_ssl_cert_file(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency")
    # A subprocess: the SDK keeps its connections for the life of the process, and the
    # environment variable must be there before httpx builds its client.
    script = (
        "import sys, tinker\n"
        "rest = tinker.RestClient(base_url=sys.argv[1], api_key=sys.argv[2])\n"
        "print([m.model_name for m in rest.get_server_capabilities().result().supported_models])\n"
    )
    env = clean_env(tmp_path, SSL_CERT_FILE=str(tls_server.tls.ca))
    done = subprocess.run(
        [sys.executable, "-c", script, tls_server.url, tls_server.key],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['tiny']"


# -- flags (in-process; nothing listens) -------------------------------------------------------


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    def _refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the server would have started")

    monkeypatch.setattr(uvicorn, "run", _refuse)


@pytest.mark.usefixtures("isolated", "no_uvicorn")
@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_one_tls_flag_alone_is_a_usage_error(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    assert main(["server", flag, str(tls.cert if flag == "--tls-cert" else tls.key)]) == 2
    err = capsys.readouterr().err
    assert "--tls-cert and --tls-key go together" in err and err.count("\n") == 1
    assert not (tmp_path / "tensafe.db").exists()  # refused before anything was created


@pytest.mark.usefixtures("isolated", "no_uvicorn")
def test_unreadable_or_mismatched_tls_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    other = make_tls_files(tmp_path / "other")
    cases = [
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tls.key)], "cannot read the file"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(tmp_path)], "--tls-key"),
        (["--tls-cert", str(tls.cert), "--tls-key", str(other.key)], "matching"),
        (["--tls-cert", str(tls.ca.parent / "nothing"), "--tls-key", str(tls.key)], "cannot read"),
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases.append((["--tls-cert", str(garbage), "--tls-key", str(tls.key)], "not a PEM certificate"))
    for flags, expected in cases:
        assert main(["server", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("tensafe: error:") and expected in err and err.count("\n") == 1, err
        assert "PRIVATE KEY" not in err
    assert not (tmp_path / "tensafe.db").exists()


def test_the_server_context_refuses_tls_1_2(tmp_path: Path) -> None:
    from tensafe.cli.server import tls_server_context

    tls = make_tls_files(tmp_path)
    context = tls_server_context(tls.cert, tls.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
