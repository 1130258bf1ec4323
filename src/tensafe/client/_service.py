"""``ServiceClient``: the entry point (sessions, training and sampling clients)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from tensafe.client._exceptions import ClientConfigurationError
from tensafe.client._futures import APIFuture, retrieve
from tensafe.client._holder import Holder
from tensafe.client._http import Transport, resolve_api_key, resolve_base_url
from tensafe.client._requests import json_result, wire_body
from tensafe.client._rest import RestClient
from tensafe.client._sampling import SamplingClient, create_sampling_client
from tensafe.client._training import TrainingClient
from tensafe.client.types import (
    GetInfoResponse,
    LoadWeightsResponse,
    OptimizerConfig,
    ServerCapabilities,
)
from tensafe.config import client_project_id
from tensafe.protocol import (
    TINKER_PATH_PREFIX,
    CreateModelRequest,
    CreateModelResponse,
    GetInfoRequest,
    LoadWeightsRequest,
    LoraConfig,
    UntypedFuture,
    model_id_for,
)

__all__ = ["ServiceClient"]


class ServiceClient:
    """Entry point of the TenSafe SDK; the same interface as ``tinker.ServiceClient``.

    Args:
        user_metadata: Metadata stored with the session.
        project_id: Project of the session (default ``$TENSAFE_PROJECT_ID``).
        display_name: Human-readable name of the session.
        base_url: Server URL (default ``$TENSAFE_BASE_URL``, then ``http://127.0.0.1:8000``).
        api_key: API key (default ``$TENSAFE_API_KEY``); must start with ``tml-``.
        default_headers_overrides: Extra headers sent with every request.
        timeout: Read timeout of one HTTP request in seconds.
        max_retries: Retries of a request after a connection error or a 5xx answer.
        allow_insecure_http: Allow a plain ``http://`` base URL whose host is not
            loopback (also ``TENSAFE_ALLOW_INSECURE_HTTP=1``). Without it such a URL is
            refused: the API key and the training data would cross the network in clear.
        ca_bundle: PEM file of the CA certificates an ``https://`` server's certificate is
            verified against (default ``$TENSAFE_CA_BUNDLE``, else ``SSL_CERT_FILE`` or
            certifi's bundle). Verification cannot be switched off.

    Raises:
        ClientConfigurationError: No API key, a key without the ``tml-`` prefix, or plain
            HTTP to a remote host without ``allow_insecure_http``.

    The API key is sent only to the origin of ``base_url``: a redirect to another scheme,
    host or port raises :class:`~tensafe.client.CrossOriginRedirectError`.

    No request is sent until the first operation; that one opens a session, which
    :meth:`close` finishes (also on leaving a ``with`` block).
    """

    def __init__(
        self,
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        *,
        display_name: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        default_headers_overrides: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        allow_insecure_http: bool = False,
        ca_bundle: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure the client (nothing is sent yet)."""
        self._base_url = resolve_base_url(base_url)
        self._api_key = resolve_api_key(api_key)
        self._headers = dict(default_headers_overrides or {})
        self._timeout, self._max_retries = timeout, max_retries
        self._allow_insecure_http = allow_insecure_http
        self._ca_bundle = ca_bundle
        transport = Transport(
            self._base_url,
            self._api_key,
            timeout=timeout,
            max_retries=max_retries,
            headers=self._headers,
            allow_insecure_http=allow_insecure_http,
            ca_bundle=ca_bundle,
        )
        self._holder = Holder(
            transport,
            user_metadata=user_metadata,
            project_id=project_id if project_id is not None else client_project_id(),
            display_name=display_name,
        )

    def __repr__(self) -> str:
        return f"ServiceClient(base_url={self._base_url!r})"

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close("success" if exc_type is None else "errored").result()

    def __getstate__(self) -> Any:
        raise TypeError("a ServiceClient holds a connection pool and cannot be pickled")

    # -- capabilities --------------------------------------------------------------------

    def get_server_capabilities(self) -> ServerCapabilities:
        """The base models this server can train."""
        return self._holder.transport.call("GET", "api/v1/get_server_capabilities", ServerCapabilities)

    async def get_server_capabilities_async(self) -> ServerCapabilities:
        """Async twin of :meth:`get_server_capabilities`."""
        return await asyncio.to_thread(self.get_server_capabilities)

    # -- training clients ----------------------------------------------------------------

    def _training_client(self, model_id: str) -> TrainingClient:
        info = self._holder.transport.call(
            "POST",
            "api/v1/get_info",
            GetInfoResponse,
            json=wire_body(GetInfoRequest, model_id=model_id, type="get_info"),
        )
        return TrainingClient(self._holder, model_id, info=info)

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> APIFuture[TrainingClient]:
        """Create a LoRA training run on ``base_model``; a future of its TrainingClient.

        The tenant's privacy policy applies: DP-SGD settings are the server's, not the
        client's.
        """
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("train at least one of the MLP, attention or unembedding layers")
        holder = self._holder
        lora = LoraConfig.model_construct(
            rank=rank, seed=seed, train_unembed=train_unembed, train_mlp=train_mlp, train_attn=train_attn
        )
        body = wire_body(
            CreateModelRequest,
            session_id=holder.session_id,
            model_seq_id=holder.next_model_seq(),
            base_model=base_model,
            lora_config=lora,
            optimizer_config=optimizer or OptimizerConfig(),
            user_metadata=user_metadata,
            type="create_model",
        )
        answer = holder.transport.call("POST", "api/v1/create_model", UntypedFuture, json=body)

        def work(cancelled: Any) -> TrainingClient:
            created = retrieve(
                holder.transport,
                answer.request_id,
                cancelled,
                on_json=json_result(CreateModelResponse),
                request_type="CreateModel",
            )
            return self._training_client(created.model_id)

        return APIFuture(holder.executor, work, request_id=answer.request_id)

    async def create_lora_training_client_async(self, base_model: str, **kwargs: Any) -> TrainingClient:
        """Async twin of :meth:`create_lora_training_client` (returns the client)."""
        future = await asyncio.to_thread(self.create_lora_training_client, base_model, **kwargs)
        return await future

    def _from_state(
        self,
        path: str,
        *,
        optimizer_state: bool,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        optimizer: OptimizerConfig | None,
    ) -> APIFuture[TrainingClient]:
        if not path.startswith(TINKER_PATH_PREFIX):
            raise ValueError("path must be a tinker://<run>/weights/<name> path")
        holder = self._holder
        session_id, model_seq = holder.session_id, holder.next_model_seq()
        body = wire_body(
            LoadWeightsRequest,
            session_id=session_id,
            model_seq_id=model_seq,
            path=path,
            optimizer=optimizer_state,
            base_model=base_model,
            user_metadata=user_metadata,
            optimizer_config=optimizer,
            type="load_weights",
        )
        answer = holder.transport.call("POST", "api/v1/load_weights", UntypedFuture, json=body)
        model_id = model_id_for(session_id, model_seq)

        def work(cancelled: Any) -> TrainingClient:
            retrieve(
                holder.transport,
                answer.request_id,
                cancelled,
                on_json=json_result(LoadWeightsResponse),
                request_type="LoadWeights",
            )
            return self._training_client(model_id)

        return APIFuture(holder.executor, work, request_id=answer.request_id)

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> APIFuture[TrainingClient]:
        """Start a new run from the weights of a saved state (fresh optimizer state)."""
        return self._from_state(
            path,
            optimizer_state=False,
            base_model=base_model,
            user_metadata=user_metadata,
            optimizer=optimizer,
        )

    async def create_training_client_from_state_async(self, path: str, **kwargs: Any) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state` (returns the client)."""
        future = await asyncio.to_thread(self.create_training_client_from_state, path, **kwargs)
        return await future

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> APIFuture[TrainingClient]:
        """Resume a run from a saved state: weights and optimizer state."""
        return self._from_state(
            path,
            optimizer_state=True,
            base_model=base_model,
            user_metadata=user_metadata,
            optimizer=optimizer,
        )

    async def create_training_client_from_state_with_optimizer_async(
        self, path: str, **kwargs: Any
    ) -> TrainingClient:
        """Async twin of :meth:`create_training_client_from_state_with_optimizer`."""
        future = await asyncio.to_thread(
            self.create_training_client_from_state_with_optimizer, path, **kwargs
        )
        return await future

    # -- sampling and REST ---------------------------------------------------------------

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        record_stability_info: bool = False,
    ) -> APIFuture[SamplingClient]:
        """Open a sampling session on saved sampler weights or a base model (a future).

        With ``record_stability_info``, every sample of the client records stability
        information for its sequences, which ``stable_reinforce`` training references by
        ``SampledSequence.sequence_id`` (``Datum.with_provenance``).
        """
        holder = self._holder
        return holder.run(
            lambda: create_sampling_client(
                holder,
                model_path=model_path,
                base_model=base_model,
                record_stability_info=record_stability_info,
            )
        )

    async def create_sampling_client_async(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        *,
        record_stability_info: bool = False,
    ) -> SamplingClient:
        """Async twin of :meth:`create_sampling_client` (returns the client)."""
        return await self.create_sampling_client(
            model_path, base_model, record_stability_info=record_stability_info
        )

    def create_rest_client(self) -> RestClient:
        """A RestClient for the same server and key (runs, checkpoints, audit, artifacts)."""
        return RestClient(
            base_url=self._base_url,
            api_key=self._api_key,
            default_headers_overrides=self._headers,
            timeout=self._timeout,
            max_retries=self._max_retries,
            allow_insecure_http=self._allow_insecure_http,
            ca_bundle=self._ca_bundle,
        )

    # -- lifecycle -----------------------------------------------------------------------

    def close(self, reason: str = "success") -> APIFuture[None]:
        """Finish the session (``success``, ``errored`` or ``interrupted``) and release resources."""
        if reason not in ("success", "errored", "interrupted"):
            raise ClientConfigurationError(f"unknown close reason {reason!r}")
        try:
            self._holder.finish(reason)
        except Exception as exc:  # delivered through the future, as for every operation
            return APIFuture.failed(exc)
        return APIFuture.completed(None)
