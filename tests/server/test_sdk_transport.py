"""SDK transport: the API key never leaves for another origin, and never crosses the network in clear.

The attacks use small ``http.server`` servers on loopback. An "origin" server answers
with redirects. A second server, or the same socket reached under another host name or
scheme, plays the attacker and records every request it gets. The first test runs the
same attack against plain httpx, configured as the SDK used to configure it, to show the
attack is real: httpx strips ``Authorization`` on a cross-origin redirect but keeps
``X-API-Key``.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tensafe.client as ts
from tensafe.client._http import MAX_REDIRECTS, Transport

KEY = "tml-" + "k" * 43
CAPABILITIES = {"supported_models": [{"model_name": "m", "trainable": True, "sampleable": True}]}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Recorder:
    """A loopback HTTP server that records every request and answers with ``respond``."""

    respond: Callable[[Seen], Answer]
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                recorder.seen.append(seen)
                status, headers, body = recorder.respond(seen)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def keys_seen(self) -> list[str | None]:
        return [s.headers.get("X-API-Key") for s in self.seen]


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[Seen], Answer]], Recorder]]:
    started: list[Recorder] = []

    def start(respond: Callable[[Seen], Answer]) -> Recorder:
        recorder = Recorder(respond)
        started.append(recorder)
        return recorder

    yield start
    for recorder in started:
        recorder.httpd.shutdown()
        recorder.httpd.server_close()


def _json(value: Any) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _redirect(location: str, status: int = 307) -> Answer:
    return status, {"Location": location}, b""


def _attacker(servers: Any) -> Recorder:
    recorder: Recorder = servers(lambda seen: _json(CAPABILITIES))
    return recorder


# --------------------------------------------------------------------------- redirects


def test_plain_httpx_hands_the_key_to_the_redirect_target(servers: Any) -> None:
    """The attack, against the old configuration (``follow_redirects=True``, key in a header)."""
    attacker = _attacker(servers)
    origin = servers(lambda seen: _redirect(attacker.url + seen.path))
    with httpx.Client(base_url=origin.url, headers={"X-API-Key": KEY}, follow_redirects=True) as http:
        assert http.get("/api/v1/get_server_capabilities").status_code == 200
    assert attacker.keys_seen() == [KEY]


@pytest.mark.parametrize("target", ["other-port", "other-host", "https"])
def test_the_sdk_refuses_a_cross_origin_redirect_without_sending_the_key(servers: Any, target: str) -> None:
    attacker = _attacker(servers)

    def respond(seen: Seen) -> Answer:
        if target == "other-port":
            return _redirect(attacker.url + seen.path)
        if target == "other-host":  # the same socket under another name: still another origin
            return _redirect(f"http://localhost:{origin.port}/stolen")
        return _redirect(f"https://127.0.0.1:{origin.port}{seen.path}", status=308)

    origin = servers(respond)
    service = ts.ServiceClient(base_url=origin.url, api_key=KEY, max_retries=3)
    with pytest.raises(ts.CrossOriginRedirectError) as caught:
        service.get_server_capabilities()
    error = caught.value
    assert error.origin == f"http://127.0.0.1:{origin.port}"
    assert (
        error.target
        == {
            "other-port": attacker.url,
            "other-host": f"http://localhost:{origin.port}",
            "https": f"https://127.0.0.1:{origin.port}",
        }[target]
    )
    assert KEY not in str(error) and "base_url" in str(error)
    assert isinstance(error, ts.APIError) and isinstance(error, ts.TensafeClientError)
    assert attacker.seen == []
    # Refused at once, never retried, and never sent a second time to the origin's socket.
    assert [s.path for s in origin.seen] == ["/api/v1/get_server_capabilities"]

    # A POST (the session is opened on the first training call) and the REST client as well.
    with pytest.raises(ts.CrossOriginRedirectError):
        service.create_lora_training_client(base_model="m", rank=4)
    rest = service.create_rest_client()
    with pytest.raises(ts.CrossOriginRedirectError):
        rest.list_training_runs().result(timeout=30)
    rest.close()
    assert attacker.seen == []
    assert all(s.path != "/stolen" for s in origin.seen)


def test_a_same_origin_redirect_is_followed_with_the_key_and_the_body(servers: Any) -> None:
    def respond(seen: Seen) -> Answer:
        if seen.path == "/api/v1/get_server_capabilities":
            return _redirect("/moved/capabilities", status=301)
        if seen.path == "/api/v1/echo":  # absolute, with the default form of the same origin
            return _redirect(f"http://127.0.0.1:{origin.port}/moved/echo", status=307)
        if seen.path == "/moved/echo":
            return _json({"echo": json.loads(seen.body)})
        return _json(CAPABILITIES)

    origin = servers(respond)
    service = ts.ServiceClient(base_url=origin.url, api_key=KEY)
    caps = service.get_server_capabilities()
    assert [m.model_name for m in caps.supported_models] == ["m"]
    transport = Transport(origin.url, KEY)
    assert transport.request("POST", "api/v1/echo", json={"a": 1}).json() == {"echo": {"a": 1}}
    transport.close()
    assert [s.path for s in origin.seen] == [
        "/api/v1/get_server_capabilities",
        "/moved/capabilities",
        "/api/v1/echo",
        "/moved/echo",
    ]
    assert origin.keys_seen() == [KEY] * 4


def test_a_redirect_loop_stops(servers: Any) -> None:
    origin = servers(lambda seen: _redirect("/again"))
    with pytest.raises(ts.APIError, match=f"more than {MAX_REDIRECTS} redirects"):
        ts.ServiceClient(base_url=origin.url, api_key=KEY, max_retries=0).get_server_capabilities()
    assert len(origin.seen) == MAX_REDIRECTS + 1


def test_no_request_with_the_key_goes_to_a_url_outside_the_base_origin(servers: Any) -> None:
    """The transport's request hook: even a URL handed over whole (e.g. a download URL) is refused."""
    attacker = _attacker(servers)
    origin = servers(lambda seen: _json(CAPABILITIES))
    transport = Transport(origin.url, KEY)
    for url in (attacker.url + "/api/v1/downloads/t", f"http://localhost:{origin.port}/x"):
        with pytest.raises(ts.CrossOriginRedirectError, match="another origin"):
            transport.request("GET", url)
    assert transport.request("GET", origin.url + "/api/v1/x").status_code == 200
    transport.close()
    assert attacker.seen == [] and [s.path for s in origin.seen] == ["/api/v1/x"]


def test_cross_origin_error_pickles() -> None:
    error = ts.CrossOriginRedirectError("refused", origin="http://a:1", target="http://b:2")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.origin, copy.target) == (
        ts.CrossOriginRedirectError,
        "refused",
        "http://a:1",
        "http://b:2",
    )


# --------------------------------------------------------------------------- plain HTTP


@pytest.fixture
def no_insecure_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("TENSAFE_ALLOW_INSECURE_HTTP", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com",
        "http://example.com:8000/prefix",
        "http://10.0.0.7:8000",
        "http://[2001:db8::1]:8000",
        "http://127.0.0.1.example.com",
        "http://localhost.example.com",
        "http://0.0.0.0:8000",
    ],
)
def test_plain_http_to_a_remote_host_is_refused(no_insecure_env: pytest.MonkeyPatch, url: str) -> None:
    for make in (ts.ServiceClient, ts.RestClient):
        with pytest.raises(ts.ClientConfigurationError) as caught:
            make(base_url=url, api_key=KEY)
        message = str(caught.value)
        assert "\n" not in message and "https://" in message
        assert "allow_insecure_http=True" in message and "TENSAFE_ALLOW_INSECURE_HTTP=1" in message


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com",
        "https://10.0.0.7:8443/prefix",
        "http://localhost:8000",
        "http://LOCALHOST:8000",
        "http://127.0.0.1:8000",
        "http://127.1.2.3",
        "http://[::1]:8000",
    ],
)
def test_https_and_loopback_http_are_accepted(no_insecure_env: pytest.MonkeyPatch, url: str) -> None:
    ts.ServiceClient(base_url=url, api_key=KEY).close().result()
    ts.RestClient(base_url=url, api_key=KEY).close()


def test_insecure_http_can_be_allowed_explicitly(no_insecure_env: pytest.MonkeyPatch) -> None:
    service = ts.ServiceClient(base_url="http://example.com", api_key=KEY, allow_insecure_http=True)
    service.create_rest_client().close()  # the REST client inherits the choice
    service.close().result()
    ts.RestClient(base_url="http://example.com", api_key=KEY, allow_insecure_http=True).close()
    for value in ("1", "true"):
        no_insecure_env.setenv("TENSAFE_ALLOW_INSECURE_HTTP", value)
        ts.ServiceClient(base_url="http://example.com", api_key=KEY).close().result()
    no_insecure_env.setenv("TENSAFE_ALLOW_INSECURE_HTTP", "0")
    with pytest.raises(ts.ClientConfigurationError, match="refusing plain HTTP"):
        ts.ServiceClient(base_url="http://example.com", api_key=KEY)
    no_insecure_env.setenv("TENSAFE_ALLOW_INSECURE_HTTP", "please")
    with pytest.raises(ts.ClientConfigurationError, match="must be 1 or 0"):
        ts.ServiceClient(base_url="http://example.com", api_key=KEY)


@given(address=st.integers(min_value=0, max_value=2**32 - 1))
def test_plain_http_is_accepted_exactly_for_127_0_0_0_slash_8(address: int) -> None:
    host = str(ipaddress.IPv4Address(address))
    loopback = address >> 24 == 127  # the oracle: the first octet
    with mock.patch.dict(os.environ):
        os.environ.pop("TENSAFE_ALLOW_INSECURE_HTTP", None)
        try:
            Transport(f"http://{host}:8000", KEY).close()
            accepted = True
        except ts.ClientConfigurationError:
            accepted = False
    assert accepted is loopback, host
