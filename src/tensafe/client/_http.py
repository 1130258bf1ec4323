"""HTTP transport: httpx, the API key header, error mapping and retries with backoff.

Only connection errors, timeouts and 5xx answers are retried (with exponential backoff
and jitter); every 4xx is final. Submits are safe to retry: the server de-duplicates
training requests by ``(model_id, seq_id)``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from tensafe._version import __version__
from tensafe.client._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    ClientConfigurationError,
    status_error,
)

__all__ = ["DEFAULT_BASE_URL", "Transport", "resolve_api_key", "resolve_base_url"]

M = TypeVar("M", bound=BaseModel)

#: Where the SDK connects when neither ``base_url`` nor ``TENSAFE_BASE_URL`` is given.
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_KEY_PREFIX = "tml-"


def resolve_base_url(base_url: str | None) -> str:
    """Return ``base_url``, else ``$TENSAFE_BASE_URL``, else :data:`DEFAULT_BASE_URL`."""
    url = base_url or os.environ.get("TENSAFE_BASE_URL") or DEFAULT_BASE_URL
    if not url.startswith(("http://", "https://")):
        raise ClientConfigurationError(f"the base URL must start with http:// or https://, not {url[:40]!r}")
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str:
    """Return ``api_key``, else ``$TENSAFE_API_KEY``; it must start with ``tml-``."""
    key = api_key or os.environ.get("TENSAFE_API_KEY") or ""
    if not key:
        raise ClientConfigurationError(
            "no API key: pass api_key=... or set TENSAFE_API_KEY (ask your operator for one: "
            "'tensafe admin create-api-key --tenant NAME')"
        )
    if not key.startswith(_KEY_PREFIX):
        raise ClientConfigurationError("the API key must start with the 'tml-' prefix")
    return key


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


class Transport:
    """A thread-safe HTTP client bound to one server and one API key."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Create the transport (no request is sent yet)."""
        self.base_url = base_url
        self.max_retries = max_retries
        self._client = httpx.Client(
            base_url=base_url + "/",
            timeout=httpx.Timeout(timeout, connect=5.0),
            headers={
                "X-API-Key": api_key,
                "User-Agent": f"tensafe-client/{__version__}",
                "Accept": "application/json",
                **dict(headers or {}),
            },
            follow_redirects=True,
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
                response = self._client.request(method, path.lstrip("/"), **kwargs)
            except httpx.TimeoutException as exc:
                if attempt >= self.max_retries or self.closed:
                    raise APITimeoutError(f"{method} {path}: the server did not answer in time") from exc
            except httpx.TransportError as exc:
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
    """Validate a JSON answer.

    Raises:
        APIResponseValidationError: The body is not JSON or does not match ``model``.
    """
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise APIResponseValidationError(
            f"unexpected answer from {response.request.url.path}: {exc.error_count()} validation errors "
            f"for {model.__name__}"
        ) from None
