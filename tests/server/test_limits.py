"""Request guard: the key is checked before any body byte is read; bodies are limited as they stream.

The attacks are run against a real uvicorn server on loopback with a raw socket client:

* a 300 MiB chunked body with no key, or with a wrong one, is answered 401 before the
  application reads a single body byte;
* the same body with a valid key is answered 413 after at most ``MAX_BODY_BYTES`` plus
  one socket read;
* a ``Content-Length`` above the limit gets 413 before any body byte is sent.

Two independent measurements back each result. An ASGI wrapper outside the whole
application counts the body bytes the server handed to it. The client counts what it
managed to send before the answer arrived; both socket buffers are pinned small, so the
slack is bounded. Body-limit arithmetic is checked with Hypothesis against the guard
alone, where a naive sum of the chunks is the oracle.

The module runs on SQLite only. The guard does the same thing on PostgreSQL, and
``test_api.py`` covers authentication there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.conftest import ServerEnv
from tensafe.server import create_app
from tensafe.server.deps import Caller
from tensafe.server.errors import AuthenticationError
from tensafe.server.limits import MAX_BODY_BYTES, PUBLIC_ROUTES, RequestGuard, is_public
from tensafe.server.tenants import Principal

MIB = 1 << 20
ATTACK_BYTES = 300 * MIB
#: Socket buffers pinned on both ends (the kernel doubles them); what the client can push
#: past a server that does not read is bounded by a few times this.
SOCKET_BUFFER = 256 * 1024
#: Slack for the client's count: both kernel buffers, uvicorn's read-ahead, one chunk.
SOCKET_SLACK = 8 * MIB


@pytest.fixture
def database_url(tmp_path: pathlib.Path) -> str:
    """SQLite only (overrides the sqlite/postgresql parametrization for this module)."""
    return f"sqlite:///{tmp_path / 'limits.db'}"


# --------------------------------------------------------------------------- harness


class BodyMeter:
    """ASGI wrapper outside everything: counts the body bytes the server handed to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.body_bytes = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.body_bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class SmallBufferServer:
    """uvicorn in a thread on a loopback socket whose receive buffer is pinned small."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # inherited by accept()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> SmallBufferServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.sock.close()


@dataclasses.dataclass
class Guarded:
    server: SmallBufferServer
    meter: BodyMeter
    key: str


@pytest.fixture
def guarded(server_env: ServerEnv) -> Iterator[Guarded]:
    settings_ = dataclasses.replace(server_env.settings, run_worker=False)
    meter = BodyMeter(create_app(settings_, store=server_env.store, key_manager=server_env.keys))
    server = SmallBufferServer(meter).start()
    try:
        yield Guarded(server, meter, server_env.tenant_key("acme"))
    finally:
        server.stop()


@dataclasses.dataclass
class Upload:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_before_answer: int  # bytes on the wire (headers, chunk framing, body) when the answer came
    sent_total: int

    def json(self) -> Any:
        return json.loads(self.body)


def upload(
    port: int,
    path: str,
    *,
    headers: dict[str, str],
    body_bytes: int,
    chunk: int = MIB,
) -> Upload:
    """POST ``body_bytes`` zero bytes, chunked (no length), while reading the answer (a raw socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in {**headers, "Transfer-Encoding": "chunked"}.items()
    )
    sent = 0
    lock = threading.Lock()
    answered = threading.Event()
    zeros = bytes(chunk)

    def frames() -> Iterator[bytes]:
        yield (head + "\r\n").encode()
        remaining = body_bytes
        while remaining > 0:
            n = min(chunk, remaining)
            remaining -= n
            yield f"{n:x}\r\n".encode() + zeros[:n] + b"\r\n"
        yield b"0\r\n\r\n"

    def sender() -> None:
        nonlocal sent
        try:
            for frame in frames():
                view = memoryview(frame)
                while view:
                    if answered.is_set():
                        return
                    n = sock.send(view)
                    with lock:
                        sent += n
                    view = view[n:]
        except OSError:
            return  # the server closed the connection: what it wanted to say is in the answer

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"the server closed without answering; got {data[:200]!r}")
        data += piece
    with lock:
        at_answer = sent
    answered.set()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    answer_headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(answer_headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            break
        rest += piece
    thread.join(60)
    sock.close()
    with lock:
        total = sent
    return Upload(int(status_line.split()[1]), answer_headers, rest[:length], at_answer, total)


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; return the status, headers and body of the first answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            assert piece, f"the server closed without answering; got {data[:200]!r}"
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        while len(body) < int(headers.get("content-length", "0")):
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
    return int(status_line.split()[1]), headers, body


JSON_ROUTE = "/api/v1/create_session"
PROTOBUF_ROUTE = "/api/v1/forward_backward"


# --------------------------------------------------------------------------- the attacks


@pytest.mark.parametrize("key", [None, "tml-" + "A" * 43], ids=["no-key", "unknown-key"])
@pytest.mark.parametrize("route", [JSON_ROUTE, PROTOBUF_ROUTE])
def test_chunked_300mib_body_without_a_valid_key_is_refused_before_any_byte_is_read(
    guarded: Guarded, key: str | None, route: str
) -> None:
    headers = {"Content-Type": "application/json" if route == JSON_ROUTE else "application/x-protobuf"}
    if key is not None:
        headers["X-API-Key"] = key
    answer = upload(guarded.server.port, route, headers=headers, body_bytes=ATTACK_BYTES)
    assert answer.status == 401
    assert answer.json()["error"] == "unauthenticated"
    assert answer.headers["connection"] == "close"
    assert guarded.meter.body_bytes == 0, "the server read body bytes of an unauthenticated request"
    assert answer.sent_before_answer < SOCKET_SLACK, answer.sent_before_answer
    assert answer.sent_total < ATTACK_BYTES // 2


@pytest.mark.parametrize("route", [JSON_ROUTE, PROTOBUF_ROUTE])
def test_chunked_300mib_body_with_a_valid_key_is_cut_at_the_limit(guarded: Guarded, route: str) -> None:
    headers = {
        "X-API-Key": guarded.key,
        "Content-Type": "application/json" if route == JSON_ROUTE else "application/x-protobuf",
    }
    answer = upload(guarded.server.port, route, headers=headers, body_bytes=ATTACK_BYTES)
    assert answer.status == 413, answer.body[:300]
    body = answer.json()
    assert body["error"] == "payload_too_large" and str(MAX_BODY_BYTES) in body["detail"]
    assert answer.headers["connection"] == "close"
    # The server took one socket read past the limit at most, and stopped there.
    assert MAX_BODY_BYTES < guarded.meter.body_bytes <= MAX_BODY_BYTES + MIB, guarded.meter.body_bytes
    assert answer.sent_before_answer <= MAX_BODY_BYTES + SOCKET_SLACK, answer.sent_before_answer
    assert answer.sent_total < ATTACK_BYTES // 2


@pytest.mark.parametrize("with_key", [True, False])
def test_content_length_above_the_limit_is_refused_before_the_body_is_sent(
    guarded: Guarded, with_key: bool
) -> None:
    headers = {"Content-Type": "application/json", "Expect": "100-continue"}
    if with_key:
        headers["X-API-Key"] = guarded.key
    # The header declares 300 MiB; nothing follows it.
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    status, answer_headers, body = exchange(
        guarded.server.port,
        f"POST {JSON_ROUTE} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {ATTACK_BYTES}\r\n\r\n".encode(),
    )
    assert status == 413, body[:300]  # not "100 Continue": the client is never invited to send
    assert json.loads(body)["error"] == "payload_too_large"
    assert answer_headers["connection"] == "close"
    assert guarded.meter.body_bytes == 0


def test_expect_100_continue_without_a_key_gets_401_not_continue(guarded: Guarded) -> None:
    status, _, body = exchange(
        guarded.server.port,
        f"POST {JSON_ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n".encode(),
    )
    assert status == 401 and json.loads(body)["error"] == "unauthenticated"
    assert guarded.meter.body_bytes == 0


def test_chunked_body_at_and_under_the_limit_reaches_the_handler(guarded: Guarded) -> None:
    """The limit is inclusive: exactly ``MAX_BODY_BYTES`` is read whole (then refused as bad JSON)."""
    headers = {"X-API-Key": guarded.key, "Content-Type": "application/json"}
    answer = upload(
        guarded.server.port, JSON_ROUTE, headers=headers, body_bytes=MAX_BODY_BYTES, chunk=4 * MIB
    )
    assert answer.status == 400 and answer.json()["error"] == "invalid_json", answer.body[:300]
    assert guarded.meter.body_bytes == MAX_BODY_BYTES

    with httpx.Client(base_url=guarded.server.url, headers={"X-API-Key": guarded.key}) as http:

        def small_chunks() -> Iterator[bytes]:
            yield b'{"tags": [], "user_metadata": {}, '
            yield b'"sdk_version": "0.38.0", "type": "create_session"}'

        r = http.post(JSON_ROUTE, content=small_chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["session_id"].startswith("sess-"), r.text


# --------------------------------------------------------------------------- routes and keys


def test_public_routes_answer_without_a_key_and_nothing_else_does(guarded: Guarded) -> None:
    with httpx.Client(base_url=guarded.server.url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/api/v1/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert "/api/v1/create_model" in http.get("/openapi.json").json()["paths"]
        assert http.get("/docs").status_code == 200 and http.get("/redoc").status_code == 200
        # The download token is the capability: an unknown token is a 404, not a 401.
        r = http.get("/api/v1/downloads/" + "x" * 43)
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        for method, path in [
            ("POST", "/healthz"),
            ("POST", "/api/v1/downloads/" + "x" * 43),
            ("GET", "/api/v1/downloads/" + "x" * 43 + "/more"),
            ("GET", "/api/v1/training_runs"),
            ("GET", "/no_such_endpoint"),
            ("GET", "/docsx"),
            ("GET", "/api/v1/tensafe/audit/records"),
        ]:
            r = http.request(method, path)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"] == "unauthenticated"


def test_public_route_list_matches_the_application(server_env: ServerEnv) -> None:
    """Every listed public route exists, and every other route of the application requires a key."""
    app = create_app(dataclasses.replace(server_env.settings, run_worker=False))
    # Routes of included routers appear in the schema; the docs routes are top-level routes;
    # the hidden /api/v1/healthz is only in its router's own table.
    from tensafe.server.routers import ROUTERS

    served: dict[str, set[str]] = {
        path: {method.upper() for method in operations} for path, operations in app.openapi()["paths"].items()
    }
    for route in [*app.routes, *(r for router in ROUTERS for r in router.routes)]:
        if getattr(route, "path", None):
            served.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())
    assert set(PUBLIC_ROUTES) <= set(served), set(PUBLIC_ROUTES) - set(served)
    assert len(served) > 40
    for path, methods in served.items():
        concrete = re.sub(r"\{[a-z_]+(:path)?\}", "x" * 43, path)
        for method in methods:
            expected = path in PUBLIC_ROUTES and method in ("GET", "HEAD")
            assert is_public(method, concrete) is expected, (method, path)


def test_a_repeated_or_non_ascii_key_header_is_refused(guarded: Guarded) -> None:
    def raw(header_lines: bytes) -> tuple[int, bytes]:
        status, _, body = exchange(
            guarded.server.port,
            b"GET /api/v1/training_runs HTTP/1.1\r\nHost: x\r\n" + header_lines + b"\r\n",
        )
        return status, body

    key = guarded.key.encode()
    assert raw(b"X-API-Key: " + key + b"\r\n")[0] == 200
    status, body = raw(b"X-API-Key: " + key + b"\r\nX-API-Key: tml-" + b"A" * 43 + b"\r\n")
    assert status == 401 and "exactly one X-API-Key" in json.loads(body)["detail"]
    assert raw(b"X-API-Key: tml-\xe9\xe9\r\n")[0] == 401


def test_a_malformed_content_length_is_a_400() -> None:
    answer = _guard_alone(lambda key: Principal("t", "key_1"), [b"+12"], limit=100, length=b"+12")
    assert answer.status == 400 and answer.body["error"] == "bad_request"
    assert answer.app_received == 0


def test_each_request_is_authenticated_once_off_the_event_loop(
    guarded: Guarded, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensafe.server.deps as deps

    calls: list[bool] = []
    real = deps.authenticate

    def spy(session: Any, key: str | None) -> Principal:
        try:
            asyncio.get_running_loop()
            calls.append(True)  # on the event loop: it would block every other request
        except RuntimeError:
            calls.append(False)
        return real(session, key)

    monkeypatch.setattr(deps, "authenticate", spy)
    with httpx.Client(base_url=guarded.server.url, headers={"X-API-Key": guarded.key}) as http:
        r = http.post(
            JSON_ROUTE,
            json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"},
        )
    assert r.status_code == 200, r.text
    assert calls == [False]


def test_caller_still_authenticates_a_router_mounted_without_the_guard(server_env: ServerEnv) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from tensafe.server.jobs import Services

    bare = FastAPI()
    bare.state.services = Services(
        sessions=server_env.sessions, store=server_env.store, signer=None, checkpoint_every=None
    )

    @bare.get("/whoami")
    def whoami(who: Caller) -> dict[str, str]:
        return {"tenant": who.tenant}

    key = server_env.tenant_key("acme")
    with TestClient(bare) as http:
        assert http.get("/whoami", headers={"X-API-Key": key}).json() == {"tenant": "acme"}
        with pytest.raises(AuthenticationError):
            http.get("/whoami", headers={"X-API-Key": "tml-" + "B" * 43})


# --------------------------------------------------------------------------- the guard alone


@dataclasses.dataclass
class GuardAnswer:
    status: int
    body: Any
    headers: dict[bytes, bytes]
    app_received: int
    app_ran: bool


def _guard_alone(
    authenticate: Any,
    chunks: list[bytes],
    *,
    limit: int,
    length: bytes | None = None,
    key: bytes | None = b"tml-key",
    path: str = "/api/v1/echo",
) -> GuardAnswer:
    """Run :class:`RequestGuard` over an echo app that reads the whole body, in process."""
    state: dict[str, Any] = {"received": 0, "ran": False}

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        state["ran"] = True
        total = 0
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            state["received"] = total
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"read": total}).encode()})

    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"x-api-key", key))
    if length is not None:
        headers.append((b"content-length", length))
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers, "state": {}}
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(RequestGuard(echo, authenticate=authenticate, max_body_bytes=limit)(scope, receive, send))
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return GuardAnswer(
        start["status"], json.loads(body), dict(start["headers"]), state["received"], state["ran"]
    )


def _anyone(key: str | None) -> Principal:
    if key is None:
        raise AuthenticationError("missing API key: send it in the X-API-Key header")
    return Principal(tenant="t", key_id="key_1")


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    limit=st.integers(min_value=0, max_value=64),
    sizes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8),
)
def test_the_body_limit_holds_for_any_chunking(limit: int, sizes: list[int]) -> None:
    chunks = [bytes(n) for n in sizes]
    total = sum(sizes)  # the oracle
    answer = _guard_alone(_anyone, chunks, limit=limit)
    if total <= limit:
        assert answer.status == 200 and answer.body == {"read": total}
    else:
        assert answer.status == 413 and answer.body["error"] == "payload_too_large"
        assert answer.headers[b"connection"] == b"close"
        # The handler never got the message that crossed the limit.
        assert answer.app_received <= limit


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs() -> None:
    answer = _guard_alone(_anyone, [bytes(10)], limit=9, length=b"10")
    assert answer.status == 413 and not answer.app_ran
    assert _guard_alone(_anyone, [bytes(9)], limit=9, length=b"9").status == 200


def test_the_guard_refuses_without_a_key_before_the_app_runs_or_reads() -> None:
    answer = _guard_alone(_anyone, [bytes(5)], limit=100, key=None)
    assert answer.status == 401 and answer.body["error"] == "unauthenticated"
    assert not answer.app_ran and answer.app_received == 0
    assert answer.headers[b"connection"] == b"close"
    # A public route needs no key; the body limit still applies there.
    public = _guard_alone(_anyone, [bytes(5)], limit=100, key=None, path="/healthz")
    assert public.status == 401  # POST is not public, only GET/HEAD


def test_an_authentication_backend_failure_is_a_500_that_does_not_read_the_body() -> None:
    def broken(key: str | None) -> Principal:
        raise OSError("database unreachable")

    answer = _guard_alone(broken, [bytes(5)], limit=100)
    assert answer.status == 500 and answer.body == {
        "error": "internal_error",
        "detail": "internal server error (OSError)",
        "category": "server",
    }
    assert not answer.app_ran
