"""``RestClient``: training runs, checkpoints, sessions, and TenSafe's audit and artifacts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

from tensafe.client._external_weights import ExternalWeightsCalls
from tensafe.client._futures import APIFuture
from tensafe.client._http import Transport, resolve_api_key, resolve_base_url
from tensafe.client._requests import wire_body
from tensafe.client.types import (
    ArtifactsResponse,
    AuditHead,
    AuditRecordsResponse,
    AuditVerification,
    CheckpointsListResponse,
    ExternalWeightsUrlsResponse,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    PrivacyReport,
    ServerCapabilities,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)
from tensafe.protocol import TinkerPath, WeightsInfoRequest
from tensafe.protocol.tensafe import SetTtlRequest

__all__ = ["RestClient"]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def _segment(value: str) -> str:
    return quote(value, safe=":")


def _checkpoint_url(training_run_id: str, checkpoint_id: str) -> str:
    """``api/v1/training_runs/<run>/checkpoints/<kind>/<name>`` with each segment quoted.

    Raises:
        InvalidTinkerPathError: (a ``ValueError``) ``checkpoint_id`` is not ``<kind>/<name>``
            or a part is invalid (checked before any request).
    """
    return _path_url(TinkerPath.from_checkpoint_id(training_run_id, checkpoint_id))


def _path_url(path: TinkerPath) -> str:
    return (
        f"api/v1/training_runs/{_segment(path.run_id)}/checkpoints/"
        f"{_segment(path.kind)}/{_segment(path.name)}"
    )


def _checkpoint_url_of(tinker_path: str) -> str:
    return _path_url(TinkerPath.parse(tinker_path))


def run_id_of(tinker_path: str) -> str:
    """Return the training run id of ``tinker://<run>/<kind>/<name>``.

    Raises:
        InvalidTinkerPathError: (a ``ValueError``) The path does not have that form.
    """
    return TinkerPath.parse(tinker_path).run_id


class RestClient(ExternalWeightsCalls):
    """The tenant's runs, checkpoints, sessions and audit. Sync methods return futures, ``*_async`` values.

    Args:
        base_url: Server URL (default ``$TENSAFE_BASE_URL``, then ``http://127.0.0.1:8000``).
        api_key: API key (default ``$TENSAFE_API_KEY``).
        default_headers_overrides: Extra headers sent with every request.
        timeout: Read timeout of one HTTP request in seconds.
        max_retries: Retries after a connection error or a 5xx answer.
        allow_insecure_http: Allow plain ``http://`` to a host that is not loopback (also
            ``TENSAFE_ALLOW_INSECURE_HTTP=1``); see :class:`~tensafe.client.ServiceClient`.
        ca_bundle: PEM CA bundle for an ``https://`` server (default ``$TENSAFE_CA_BUNDLE``);
            see :class:`~tensafe.client.ServiceClient`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        default_headers_overrides: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        allow_insecure_http: bool = False,
        ca_bundle: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure the client (nothing is sent yet)."""
        self._transport = Transport(
            resolve_base_url(base_url),
            resolve_api_key(api_key),
            timeout=timeout,
            max_retries=max_retries,
            headers=default_headers_overrides,
            allow_insecure_http=allow_insecure_http,
            ca_bundle=ca_bundle,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="tensafe-rest")

    def __repr__(self) -> str:
        return f"RestClient(base_url={self._transport.base_url!r})"

    def close(self) -> None:
        """Release the connection pool and the threads."""
        self._executor.shutdown(wait=False)
        self._transport.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, model: type[M], **params: Any) -> M:
        return self._transport.call(
            "GET", path, model, params={k: v for k, v in params.items() if v is not None} or None
        )

    def _send(self, method: str, path: str, json: Any = None) -> None:
        self._transport.request(method, path, json=json)

    def _future(self, fn: Callable[[], T]) -> APIFuture[T]:
        return APIFuture(self._executor, lambda _cancelled: fn())

    # -- Tinker's REST calls -------------------------------------------------------------

    def _capabilities(self) -> ServerCapabilities:
        return self._get("api/v1/get_server_capabilities", ServerCapabilities)

    def get_server_capabilities(self) -> APIFuture[ServerCapabilities]:
        """The base models this server can train."""
        return self._future(self._capabilities)

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        """Async twin of :meth:`get_server_capabilities`."""
        return await asyncio.to_thread(self._capabilities)

    def _runs(self, limit: int, offset: int) -> TrainingRunsResponse:
        return self._get("api/v1/training_runs", TrainingRunsResponse, limit=limit, offset=offset)

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> APIFuture[TrainingRunsResponse]:
        """The tenant's training runs, newest first."""
        return self._future(lambda: self._runs(limit, offset))

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0) -> TrainingRunsResponse:
        """Async twin of :meth:`list_training_runs`."""
        return await asyncio.to_thread(self._runs, limit, offset)

    def _run(self, training_run_id: str) -> TrainingRun:
        return self._get(f"api/v1/training_runs/{_segment(training_run_id)}", TrainingRun)

    def get_training_run(self, training_run_id: str) -> APIFuture[TrainingRun]:
        """One training run (``NotFoundError`` for unknown runs and other tenants' runs)."""
        return self._future(lambda: self._run(training_run_id))

    async def get_training_run_async(self, training_run_id: str) -> TrainingRun:
        """Async twin of :meth:`get_training_run`."""
        return await asyncio.to_thread(self._run, training_run_id)

    def get_training_run_by_tinker_path(self, tinker_path: str) -> APIFuture[TrainingRun]:
        """The training run a ``tinker://`` path belongs to."""
        run_id = run_id_of(tinker_path)
        return self._future(lambda: self._run(run_id))

    async def get_training_run_by_tinker_path_async(self, tinker_path: str) -> TrainingRun:
        """Async twin of :meth:`get_training_run_by_tinker_path`."""
        return await asyncio.to_thread(self._run, run_id_of(tinker_path))

    def _checkpoints(self, training_run_id: str) -> CheckpointsListResponse:
        return self._get(
            f"api/v1/training_runs/{_segment(training_run_id)}/checkpoints", CheckpointsListResponse
        )

    def list_checkpoints(self, training_run_id: str) -> APIFuture[CheckpointsListResponse]:
        """Checkpoints of one run."""
        return self._future(lambda: self._checkpoints(training_run_id))

    async def list_checkpoints_async(self, training_run_id: str) -> CheckpointsListResponse:
        """Async twin of :meth:`list_checkpoints`."""
        return await asyncio.to_thread(self._checkpoints, training_run_id)

    def _user_checkpoints(self, limit: int, offset: int) -> CheckpointsListResponse:
        return self._get("api/v1/checkpoints", CheckpointsListResponse, limit=limit, offset=offset)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[CheckpointsListResponse]:
        """Checkpoints across the tenant's runs, newest first."""
        return self._future(lambda: self._user_checkpoints(limit, offset))

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> CheckpointsListResponse:
        """Async twin of :meth:`list_user_checkpoints`."""
        return await asyncio.to_thread(self._user_checkpoints, limit, offset)

    def _sessions(self, limit: int, offset: int) -> ListSessionsResponse:
        return self._get("api/v1/sessions", ListSessionsResponse, limit=limit, offset=offset)

    def list_sessions(self, limit: int = 20, offset: int = 0) -> APIFuture[ListSessionsResponse]:
        """The tenant's session ids, newest first."""
        return self._future(lambda: self._sessions(limit, offset))

    async def list_sessions_async(self, limit: int = 20, offset: int = 0) -> ListSessionsResponse:
        """Async twin of :meth:`list_sessions`."""
        return await asyncio.to_thread(self._sessions, limit, offset)

    def _session(self, session_id: str) -> GetSessionResponse:
        return self._get(f"api/v1/sessions/{_segment(session_id)}", GetSessionResponse)

    def get_session(self, session_id: str) -> APIFuture[GetSessionResponse]:
        """One session and its training runs."""
        return self._future(lambda: self._session(session_id))

    async def get_session_async(self, session_id: str) -> GetSessionResponse:
        """Async twin of :meth:`get_session`."""
        return await asyncio.to_thread(self._session, session_id)

    def _weights_info(self, tinker_path: str) -> WeightsInfoResponse:
        return self._transport.call(
            "POST",
            "api/v1/weights_info",
            WeightsInfoResponse,
            json=wire_body(WeightsInfoRequest, tinker_path=tinker_path),
        )

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[WeightsInfoResponse]:
        """What a checkpoint holds: base model, LoRA rank and trained modules (any kind of path)."""
        TinkerPath.parse(tinker_path)
        return self._future(lambda: self._weights_info(tinker_path))

    async def get_weights_info_by_tinker_path_async(self, tinker_path: str) -> WeightsInfoResponse:
        """Async twin of :meth:`get_weights_info_by_tinker_path`."""
        TinkerPath.parse(tinker_path)
        return await asyncio.to_thread(self._weights_info, tinker_path)

    @staticmethod
    def _external_url(tinker_path: str) -> str:
        parsed = TinkerPath.parse(tinker_path)
        if parsed.kind != "external_weights":
            raise ValueError(
                "get_external_weights_urls only accepts external weights checkpoints "
                f"(tinker://<training_run_id>/external_weights/<name>), got {tinker_path[:80]!r}"
            )
        return _path_url(parsed) + "/external_weights_urls"

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[ExternalWeightsUrlsResponse]:
        """Short-lived download URLs, one per file, of an ``external_weights`` checkpoint.

        Each URL is a bearer capability (a plain GET downloads the file, no API key) until
        ``expires``: keep the URLs out of logs.

        Raises:
            ValueError: (at once) ``tinker_path`` is not ``tinker://<run>/external_weights/<name>``.
        """
        url = self._external_url(tinker_path)
        return self._future(lambda: self._get(url, ExternalWeightsUrlsResponse))

    async def get_external_weights_urls_async(self, tinker_path: str) -> ExternalWeightsUrlsResponse:
        """Async twin of :meth:`get_external_weights_urls`."""
        url = self._external_url(tinker_path)
        return await asyncio.to_thread(self._get, url, ExternalWeightsUrlsResponse)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        """Delete a checkpoint (``checkpoint_id`` is ``<kind>/<name>``) and its encrypted files."""
        url = _checkpoint_url(training_run_id, checkpoint_id)
        return self._future(lambda: self._send("DELETE", url))

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        """Async twin of :meth:`delete_checkpoint`."""
        await asyncio.to_thread(self._send, "DELETE", _checkpoint_url(training_run_id, checkpoint_id))

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Delete the checkpoint a ``tinker://`` path names."""
        url = _checkpoint_url_of(tinker_path)
        return self._future(lambda: self._send("DELETE", url))

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async twin of :meth:`delete_checkpoint_from_tinker_path`."""
        await asyncio.to_thread(self._send, "DELETE", _checkpoint_url_of(tinker_path))

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Mark a checkpoint public.

        TenSafe publishes only checkpoints of runs trained with differential privacy
        (``BadRequestError`` otherwise), and ``public`` grants **no** access to other
        tenants: they still get ``NotFoundError``.
        """
        url = _checkpoint_url_of(tinker_path) + "/publish"
        return self._future(lambda: self._send("POST", url))

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async twin of :meth:`publish_checkpoint_from_tinker_path`."""
        await asyncio.to_thread(self._send, "POST", _checkpoint_url_of(tinker_path) + "/publish")

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Clear a checkpoint's ``public`` flag (a no-op when it is not public)."""
        url = _checkpoint_url_of(tinker_path) + "/publish"
        return self._future(lambda: self._send("DELETE", url))

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async twin of :meth:`unpublish_checkpoint_from_tinker_path`."""
        await asyncio.to_thread(self._send, "DELETE", _checkpoint_url_of(tinker_path) + "/publish")

    def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> APIFuture[None]:
        """Expire a checkpoint ``ttl_seconds`` from now (3600 s to 10 years), or never (``None``).

        An expired checkpoint is invisible at once and deleted by the server's sweeper.
        """
        url = _checkpoint_url_of(tinker_path) + "/ttl"
        body = wire_body(SetTtlRequest, ttl_seconds=ttl_seconds, exclude_none=False)
        return self._future(lambda: self._send("PUT", url, body))

    async def set_checkpoint_ttl_from_tinker_path_async(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> None:
        """Async twin of :meth:`set_checkpoint_ttl_from_tinker_path`."""
        url = _checkpoint_url_of(tinker_path) + "/ttl"
        body = wire_body(SetTtlRequest, ttl_seconds=ttl_seconds, exclude_none=False)
        await asyncio.to_thread(self._send, "PUT", url, body)

    def _sampler(self, sampler_id: str) -> GetSamplerResponse:
        return self._get(f"api/v1/samplers/{_segment(sampler_id)}", GetSamplerResponse)

    def get_sampler(self, sampler_id: str) -> APIFuture[GetSamplerResponse]:
        """A sampling session (``<session>:sample:<n>``): its base model and weights path."""
        return self._future(lambda: self._sampler(sampler_id))

    async def get_sampler_async(self, sampler_id: str) -> GetSamplerResponse:
        """Async twin of :meth:`get_sampler`."""
        return await asyncio.to_thread(self._sampler, sampler_id)

    # -- TenSafe additions ---------------------------------------------------------------

    def _audit(self, limit: int) -> AuditRecordsResponse:
        return self._get("api/v1/tensafe/audit/records", AuditRecordsResponse, limit=limit)

    def list_audit_records(self, limit: int = 100) -> APIFuture[AuditRecordsResponse]:
        """The newest ``limit`` records of the tenant's audit chain (oldest first)."""
        return self._future(lambda: self._audit(limit))

    async def list_audit_records_async(self, limit: int = 100) -> AuditRecordsResponse:
        """Async twin of :meth:`list_audit_records`."""
        return await asyncio.to_thread(self._audit, limit)

    def _audit_head(self) -> AuditHead:
        return self._get("api/v1/tensafe/audit/head", AuditHead)

    def get_audit_head(self) -> APIFuture[AuditHead]:
        """The newest signed checkpoint of the tenant's audit chain, to keep as the known head.

        The server signs one first if records follow the newest checkpoint. Store the
        result where the server's operators cannot write (``head.to_json()`` is a head
        file) and pass it to :meth:`verify_audit` later. Its signature is not checked
        here: check it with the deployment's public key from the operator, obtained out of
        band (``tensafe audit verify-head``), never with a key the server provides.
        """
        return self._future(self._audit_head)

    async def get_audit_head_async(self) -> AuditHead:
        """Async twin of :meth:`get_audit_head`."""
        return await asyncio.to_thread(self._audit_head)

    def _verify(self, known_head: AuditHead | None) -> AuditVerification:
        if known_head is None:
            return self._get("api/v1/tensafe/audit/verify", AuditVerification)
        return self._get(
            "api/v1/tensafe/audit/verify",
            AuditVerification,
            known_length=known_head.length,
            known_head_hash=known_head.head_hash,
        )

    def verify_audit(self, known_head: AuditHead | None = None) -> APIFuture[AuditVerification]:
        """Have the server verify the tenant's audit chain, its signed checkpoints and interval.

        With ``known_head`` (a head kept from :meth:`get_audit_head`), the chain must also
        still contain that head: a chain rolled back below it or rewritten fails. A broken
        chain is a result (``verified`` false, with the ``reason``), not an error. The
        server re-verifies the whole chain at most once per interval (``cached``,
        ``verified_at``). For a check that does not trust the server, export the chain
        with ``tensafe audit export`` and verify the bundle offline with ``--known-head``.
        """
        return self._future(lambda: self._verify(known_head))

    async def verify_audit_async(self, known_head: AuditHead | None = None) -> AuditVerification:
        """Async twin of :meth:`verify_audit`."""
        return await asyncio.to_thread(self._verify, known_head)

    def _artifacts(self, limit: int, offset: int) -> ArtifactsResponse:
        return self._get("api/v1/tensafe/artifacts", ArtifactsResponse, limit=limit, offset=offset)

    def list_artifacts(self, limit: int = 100, offset: int = 0) -> APIFuture[ArtifactsResponse]:
        """The tenant's encrypted artifacts (newest first) and what references each one."""
        return self._future(lambda: self._artifacts(limit, offset))

    async def list_artifacts_async(self, limit: int = 100, offset: int = 0) -> ArtifactsResponse:
        """Async twin of :meth:`list_artifacts`."""
        return await asyncio.to_thread(self._artifacts, limit, offset)

    def _privacy(self, training_run_id: str) -> PrivacyReport:
        return self._get(f"api/v1/tensafe/training_runs/{_segment(training_run_id)}/privacy", PrivacyReport)

    def get_privacy(self, training_run_id: str) -> APIFuture[PrivacyReport]:
        """The privacy budget of a run (as ``TrainingClient.get_privacy``)."""
        return self._future(lambda: self._privacy(training_run_id))

    async def get_privacy_async(self, training_run_id: str) -> PrivacyReport:
        """Async twin of :meth:`get_privacy`."""
        return await asyncio.to_thread(self._privacy, training_run_id)
