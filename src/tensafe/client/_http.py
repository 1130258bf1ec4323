"""HTTP transport: httpx, the API key header, error mapping and retries with backoff.

Only connection errors, timeouts and 5xx answers are retried (with exponential backoff
and jitter); every 4xx is final. Submits are safe to retry: the server de-duplicates
training requests by ``(model_id, seq_id)``.

The API key goes only to the origin (scheme, host, port) of ``base_url``:

* Redirects are followed only within that origin (at most :data:`MAX_REDIRECTS`). A
  redirect elsewhere raises :class:`CrossOriginRedirectError` before anything is sent
  there. (httpx's own redirect handling strips only ``Authorization``, not
  ``X-API-Key``, so it is switched off.) An httpx request hook checks every request
  the client sends, as a second line: none leaves for another origin.
* A plain ``http://`` base URL is refused unless its host is loopback (``localhost``,
  127.0.0.0/8, ``::1``) or insecure HTTP is allowed explicitly
  (``allow_insecure_http=True`` or ``TENSAFE_ALLOW_INSECURE_HTTP=1``).

An ``https://`` server's certificate is always verified: against the CA bundle given as
``ca_bundle=`` or ``TENSAFE_CA_BUNDLE`` (only those CAs are trusted), else against httpx's
default trust (``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set, else certifi's bundle). There is
no switch that turns verification off.
"""

from __future__ import annotations

import ipaddress
import os
import random
import ssl
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from tensafe._version import __version__
from tensafe.client._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    ClientConfigurationError,
    CrossOriginRedirectError,
    status_error,
)
from tensafe.config import (
    DEFAULT_CLIENT_BASE_URL,
    EnvironmentVariableError,
    client_allow_insecure_http,
    client_api_key,
    client_base_url,
    client_ca_bundle,
)
from tensafe.protocol import parse_lenient_json

__all__ = [
    "ALLOW_INSECURE_HTTP_ENV",
    "CA_BUNDLE_ENV",
    "DEFAULT_BASE_URL",
    "MAX_REDIRECTS",
    "Transport",
    "check_transport_security",
    "resolve_api_key",
    "resolve_base_url",
    "tls_verification",
]

M = TypeVar("M", bound=BaseModel)

#: Where the SDK connects when neither ``base_url`` nor ``TENSAFE_BASE_URL`` is given.
DEFAULT_BASE_URL = DEFAULT_CLIENT_BASE_URL
#: Environment variable that, set to ``1``, allows plain ``http://`` to a non-loopback host.
ALLOW_INSECURE_HTTP_ENV = "TENSAFE_ALLOW_INSECURE_HTTP"
#: Environment variable naming a PEM CA bundle that server certificates are verified against.
CA_BUNDLE_ENV = "TENSAFE_CA_BUNDLE"
#: The most same-origin redirects one request follows.
MAX_REDIRECTS = 10
_KEY_PREFIX = "tml-"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def resolve_base_url(base_url: str | None) -> str:
    """Return ``base_url``, else ``$TENSAFE_BASE_URL``, else :data:`DEFAULT_BASE_URL`."""
    url = base_url or client_base_url()
    if not url.startswith(("http://", "https://")):
        raise ClientConfigurationError(f"the base URL must start with http:// or https://, not {url[:40]!r}")
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str:
    """Return ``api_key``, else ``$TENSAFE_API_KEY``; it must start with ``tml-``."""
    key = api_key or client_api_key()
    if not key:
        raise ClientConfigurationError(
            "no API key: pass api_key=... or set TENSAFE_API_KEY (ask your operator for one: "
            "'tensafe admin create-api-key --tenant NAME')"
        )
    if not key.startswith(_KEY_PREFIX):
        raise ClientConfigurationError("the API key must start with the 'tml-' prefix")
    return key


def _env_allows_insecure_http() -> bool:
    try:
        return client_allow_insecure_http()
    except EnvironmentVariableError as exc:
        raise ClientConfigurationError(str(exc)) from None


def tls_verification(ca_bundle: str | os.PathLike[str] | None = None) -> ssl.SSLContext | bool:
    """What httpx verifies server certificates against (never nothing).

    Args:
        ca_bundle: A PEM file of CA certificates (default ``$TENSAFE_CA_BUNDLE``). When given,
            only these CAs are trusted.

    Returns:
        An :class:`ssl.SSLContext` trusting ``ca_bundle``, or ``True`` for httpx's default
        trust (``SSL_CERT_FILE``/``SSL_CERT_DIR``, else certifi).

    Raises:
        ClientConfigurationError: The bundle cannot be read or holds no CA certificate.
    """
    path = ca_bundle if ca_bundle is not None else client_ca_bundle()
    if path is None:
        return True
    try:
        return ssl.create_default_context(cafile=os.fspath(path))
    except (OSError, ssl.SSLError) as exc:
        raise ClientConfigurationError(
            f"cannot load the CA bundle {os.fspath(path)!r} (ca_bundle or {CA_BUNDLE_ENV}): "
            f"{getattr(exc, 'strerror', None) or exc}; give a readable PEM file of CA certificates"
        ) from None


def _certificate_failure(exc: BaseException) -> str | None:
    """The verification error behind a transport error, if a certificate did not verify."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or "certificate verify failed")
        current = current.__cause__ or current.__context__
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport_security(base_url: str, *, allow_insecure_http: bool = False) -> None:
    """Refuse to send the API key in clear text to another machine.

    ``https://`` is always accepted, and so is ``http://`` to a loopback host
    (``localhost``, 127.0.0.0/8, ``::1``). Plain HTTP to any other host needs
    ``allow_insecure_http=True`` or ``TENSAFE_ALLOW_INSECURE_HTTP=1``.

    Raises:
        ClientConfigurationError: Plain HTTP to a remote host was not allowed, or the URL
            has no host.
    """
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ClientConfigurationError(f"invalid base URL: {exc}") from None
    if not url.host:
        raise ClientConfigurationError(f"the base URL {base_url[:80]!r} has no host")
    if url.scheme != "http" or _is_loopback(url.host):
        return
    if allow_insecure_http or _env_allows_insecure_http():
        return
    raise ClientConfigurationError(
        f"refusing plain HTTP to {url.host!r}: the API key and your data would cross the network "
        f"unencrypted; use an https:// base URL, or allow it explicitly with allow_insecure_http=True "
        f"or {ALLOW_INSECURE_HTTP_ENV}=1"
    )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _origin_text(url: httpx.URL) -> str:
    scheme, host, port = _origin(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port is None else f":{port}")


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


class Transport:
    """A thread-safe HTTP client bound to one server and one API key.

    Raises:
        ClientConfigurationError: ``base_url`` is plain HTTP to a remote host and insecure
            HTTP was not allowed (see :func:`check_transport_security`).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        headers: Mapping[str, str] | None = None,
        allow_insecure_http: bool = False,
        ca_bundle: str | os.PathLike[str] | None = None,
    ) -> None:
        """Create the transport (no request is sent yet)."""
        check_transport_security(base_url, allow_insecure_http=allow_insecure_http)
        verify = tls_verification(ca_bundle)
        self.base_url = base_url
        self.max_retries = max_retries
        self._origin = _origin(httpx.URL(base_url))
        self._client = httpx.Client(
            base_url=base_url + "/",
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={
                "X-API-Key": api_key,
                "User-Agent": f"tensafe-client/{__version__}",
                "Accept": "application/json",
                **dict(headers or {}),
            },
            # Redirects are followed by request(), only within the origin of base_url.
            follow_redirects=False,
            event_hooks={"request": [self._only_own_origin]},
            verify=verify,
        )
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"Transport(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._closed.set()
        self._client.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def _refuse_cross_origin(self, url: httpx.URL, *, redirect: bool) -> None:
        if _origin(url) == self._origin:
            return
        base = _origin_text(httpx.URL(self.base_url))
        target = _origin_text(url)
        why = "the server redirected to" if redirect else "a request was addressed to"
        raise CrossOriginRedirectError(
            f"{why} {target}, another origin than the base URL ({base}): refusing, so that the API key "
            f"is not sent there; if the server has moved, use its new address as base_url",
            origin=base,
            target=target,
        )

    def _only_own_origin(self, request: httpx.Request) -> None:
        """httpx request hook: nothing carrying the API key leaves for another origin."""
        self._refuse_cross_origin(request.url, redirect=False)

    def _send(self, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        """Send one request, following redirects within the origin of ``base_url`` only."""
        response = self._client.request(method, path.lstrip("/"), **kwargs)
        hops = 0
        while response.next_request is not None:
            target = response.next_request
            response.close()
            self._refuse_cross_origin(target.url, redirect=True)
            hops += 1
            if hops > MAX_REDIRECTS:
                raise APIError(f"{method} {path}: more than {MAX_REDIRECTS} redirects; check base_url")
            response = self._client.send(target)
        return response

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(0.5 * 2**attempt, 10.0) * random.uniform(0.75, 1.0))  # noqa: S311 (jitter, not a secret)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        accept: Collection[int] = (),
    ) -> httpx.Response:
        """Send a request; return the answer if it is 2xx or in ``accept``.

        Raises:
            APIStatusError: (a subclass per status) for any other answer.
            APIConnectionError: The server could not be reached after the retries.
        """
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if json is not None:
            kwargs["json"] = json
        if content is not None:
            kwargs["content"] = content
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=5.0)
        attempt = 0
        while True:
            try:
                response = self._send(method, path, kwargs)
            except httpx.TimeoutException as exc:
                if attempt >= self.max_retries or self.closed:
                    raise APITimeoutError(f"{method} {path}: the server did not answer in time") from exc
            except httpx.TransportError as exc:
                reason = _certificate_failure(exc)
                if reason is not None:  # not transient: retrying cannot help
                    raise APIConnectionError(
                        f"{method} {path}: the TLS certificate of {self.base_url} does not verify "
                        f"({reason}); if the server uses your own CA, pass ca_bundle=... or set "
                        f"{CA_BUNDLE_ENV}"
                    ) from exc
                if attempt >= self.max_retries or self.closed:
                    raise APIConnectionError(
                        f"{method} {path}: cannot reach {self.base_url} ({type(exc).__name__})"
                    ) from exc
            else:
                if response.status_code < 400 or response.status_code in accept:
                    return response
                if response.status_code < 500 or attempt >= self.max_retries:
                    raise status_error(response.status_code, _body(response))
            self._backoff(attempt)
            attempt += 1

    def call(self, method: str, path: str, model: type[M], **kwargs: Any) -> M:
        """Send a request and validate its JSON answer with ``model``."""
        response = self.request(method, path, **kwargs)
        return parse(model, response)


def parse(model: type[M], response: httpx.Response) -> M:
    """Validate a JSON answer leniently (unknown fields ignored at any depth; :mod:`tensafe.protocol`).

    Raises:
        APIResponseValidationError: The body is not JSON or does not match ``model``.
    """
    try:
        return parse_lenient_json(model, response.content)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"unexpected answer from {response.request.url.path}: {exc.error_count()} validation errors "
            f"for {model.__name__}"
        ) from None
