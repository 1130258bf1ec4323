"""``TrainingClient``: forward/backward, optimizer steps, checkpoints, privacy of one run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote

from tensafe.client._custom_loss import (
    CustomLossFn,
    backward_data,
    compute_custom_loss,
    forward_data,
    merge_metrics,
)
from tensafe.client._exceptions import APIResponseValidationError, RequestFailedError
from tensafe.client._futures import APIFuture, retrieve
from tensafe.client._holder import Holder
from tensafe.client._http import parse
from tensafe.client._requests import json_result, wire_body
from tensafe.client._tokenizer import load_tokenizer
from tensafe.client._wire import decode_forward_backward_output, encode_forward_backward_request
from tensafe.client.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    OptimStepResponse,
    PrivacyReport,
    RegisterDatasetResponse,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TrainStepResponse,
)
from tensafe.protocol import (
    GetInfoRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    TrainStepRequest,
    UntypedFuture,
)
from tensafe.protocol.tensafe import SaveWeightsExternalRequest

if TYPE_CHECKING:
    from tensafe.client._sampling import SamplingClient

__all__ = ["TrainingClient"]

T = TypeVar("T")


def _json_only(what: str) -> Callable[[dict[str, Any]], Any]:
    def reject(_body: dict[str, Any]) -> Any:
        raise APIResponseValidationError(f"the server sent a JSON {what} result; expected protobuf")

    return reject


def _settle(gate: concurrent.futures.Future[None], error: BaseException | None) -> None:
    """Resolve ``gate`` unless it already is (a cancellation may race the work's own outcome)."""
    try:
        if error is None:
            gate.set_result(None)
        else:
            gate.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class TrainingClient:
    """A LoRA training run on the server (its id is the model id ``<session>:train:<n>``).

    Requests are numbered (``seq_id`` 1, 2, ...) and submitted in the order of the calls,
    so the server runs them in that order; each call returns as soon as the server has
    accepted the request, with an :class:`APIFuture` of its result.
    """

    def __init__(self, holder: Holder, model_id: str, *, info: GetInfoResponse | None = None) -> None:
        """Bind to an existing model (use ``ServiceClient.create_*_training_client``)."""
        self._holder = holder
        self.model_id = model_id
        self._info = info
        self._seq = 0
        self._submit_lock = threading.Lock()
        # Set while a forward_backward_custom has not yet submitted its backward pass: later
        # requests wait for it (the server runs a model's queued requests in seq_id order).
        self._gate: concurrent.futures.Future[None] | None = None

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any] | bytes) -> str:
        """Send one submission; return the server's request id."""
        transport = self._holder.transport
        if isinstance(body, bytes):
            answer = transport.call(
                "POST", path, UntypedFuture, content=body, headers={"Content-Type": "application/x-protobuf"}
            )
        else:
            answer = transport.call("POST", path, UntypedFuture, json=body)
        return answer.request_id

    def _wait_turn(self) -> None:
        """Wait (submit lock held) until an earlier ``forward_backward_custom`` submitted its backward.

        Raises:
            RequestFailedError: That custom loss failed or was cancelled before its backward
                pass was submitted; as in the Tinker SDK, this client then accepts no further
                training requests.
        """
        gate = self._gate
        if gate is None:
            return
        try:
            gate.result()
        except BaseException as exc:
            raise RequestFailedError(
                f"an earlier forward_backward_custom failed before its backward pass was submitted "
                f"({type(exc).__name__}); this TrainingClient accepts no more training requests "
                "(create a new one, e.g. from a saved state)",
                category="user",
            ) from exc
        self._gate = None

    def _track(
        self,
        request_id: str,
        request_type: str,
        *,
        on_json: Callable[[dict[str, Any]], T],
        on_proto: Callable[[bytes], T] | None = None,
    ) -> APIFuture[T]:
        transport = self._holder.transport
        return APIFuture(
            self._holder.executor,
            lambda cancelled: retrieve(
                transport,
                request_id,
                cancelled,
                on_json=on_json,
                on_proto=on_proto,
                request_type=request_type,
            ),
            request_id=request_id,
        )

    def _submit(
        self,
        path: str,
        request_type: str,
        build: Callable[[int], dict[str, Any] | bytes],
        *,
        on_json: Callable[[dict[str, Any]], T],
        on_proto: Callable[[bytes], T] | None = None,
    ) -> APIFuture[T]:
        with self._submit_lock:
            self._wait_turn()
            self._seq += 1
            request_id = self._post(path, build(self._seq))
        return self._track(request_id, request_type, on_json=on_json, on_proto=on_proto)

    @staticmethod
    async def _thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- compute -------------------------------------------------------------------------

    def _forward(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None,
        forward_only: bool,
    ) -> APIFuture[ForwardBackwardOutput]:
        data = [d if isinstance(d, Datum) else Datum.model_validate(d) for d in data]
        return self._submit(
            "api/v1/forward_backward",
            "Forward" if forward_only else "ForwardBackward",
            lambda seq: encode_forward_backward_request(
                model_id=self.model_id,
                seq_id=seq,
                data=data,
                loss_fn=loss_fn,
                loss_fn_config=loss_fn_config,
                forward_only=forward_only,
            ),
            on_json=_json_only("forward_backward"),
            on_proto=decode_forward_backward_output,
        )

    def forward_backward(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and accumulate gradients (DP-clipped per example on the server).

        Args:
            data: The batch (sent in one request).
            loss_fn: ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo``, ``dro``, ``gspo``
                or ``stable_reinforce`` (whose datums carry provenance spans,
                ``Datum.with_provenance``, naming sequences sampled with
                ``record_stability_info``).
            loss_fn_config: Loss settings such as ``clip_low_threshold`` or ``beta``.

        Returns:
            A future of the per-datum logprobs and ``name:reduction`` metrics.
        """
        return self._forward(data, loss_fn, loss_fn_config, False)

    async def forward_backward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward_backward`."""
        return await self._thread(self.forward_backward, data, loss_fn, loss_fn_config)

    def forward(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Compute the loss and logprobs without accumulating gradients."""
        return self._forward(data, loss_fn, loss_fn_config, True)

    async def forward_async(
        self,
        data: Sequence[Datum],
        loss_fn: str,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward`."""
        return await self._thread(self.forward, data, loss_fn, loss_fn_config)

    def forward_backward_custom(
        self,
        data: Sequence[Datum],
        loss_fn: CustomLossFn,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Forward/backward with a loss computed on this machine from the logprobs (NumPy, no torch).

        As in the Tinker SDK: a ``forward`` with ``cross_entropy`` (``target_tokens`` and the
        given ``weights``, zeros when absent), then ``loss_fn`` on the logprobs, then a
        ``forward_backward`` with ``cross_entropy`` and ``weights = -dC/dlogprobs``. Unlike
        Tinker's torch callable, ``loss_fn(data, logprobs)`` returns ``(loss, metrics,
        grads)``: ``logprobs[i]`` is datum ``i``'s float64 array and ``grads[i]`` its
        gradient ``dC/dlogprobs[i]`` (same shape). Only ``target_tokens`` and the weights
        are sent; ``loss_fn`` sees every ``loss_fn_inputs`` field.

        The two requests take consecutive seq_ids. Training requests made after this call
        wait (in the caller's thread) until the backward pass has been submitted; if the
        loss fails or the future is cancelled first, they raise ``RequestFailedError``, and
        so does every later training request of this client (as in the Tinker SDK).

        Args:
            data: The batch.
            loss_fn: ``(data, logprobs) -> (loss, metrics, grads)`` on NumPy arrays.
            loss_type_input: Only ``"logprobs"`` (or ``None``), for Tinker compatibility.

        Returns:
            A future (its ``request_id`` is the forward pass's) of the backward pass's
            output; ``metrics["loss:sum"]`` is the custom
            loss, ``metrics["surrogate_loss:sum"]`` the server's weighted cross-entropy, and
            the loss function's metrics are merged in.

        Raises:
            ValueError: (at once) An empty batch, a datum without ``target_tokens``, or an
                unsupported ``loss_type_input``.
        """
        if loss_type_input not in (None, "logprobs"):
            raise ValueError(f"loss_type_input must be 'logprobs' or None, not {loss_type_input!r}")
        data = [d if isinstance(d, Datum) else Datum.model_validate(d) for d in data]
        if not data:
            raise ValueError("forward_backward_custom needs at least one datum")
        fwd_data = forward_data(data)
        gate: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._submit_lock:
            self._wait_turn()
            self._seq += 2
            fwd_seq, bwd_seq = self._seq - 1, self._seq
            fwd_id = self._post(
                "api/v1/forward_backward",
                encode_forward_backward_request(
                    model_id=self.model_id,
                    seq_id=fwd_seq,
                    data=fwd_data,
                    loss_fn="cross_entropy",
                    forward_only=True,
                ),
            )
            self._gate = gate
        transport = self._holder.transport

        def work(cancelled: threading.Event) -> ForwardBackwardOutput:
            try:
                forward = retrieve(
                    transport,
                    fwd_id,
                    cancelled,
                    on_json=_json_only("forward"),
                    on_proto=decode_forward_backward_output,
                    request_type="Forward",
                )
                custom = compute_custom_loss(loss_fn, data, forward)
                if cancelled.is_set():
                    raise concurrent.futures.CancelledError()
                bwd_id = self._post(
                    "api/v1/forward_backward",
                    encode_forward_backward_request(
                        model_id=self.model_id,
                        seq_id=bwd_seq,
                        data=backward_data(data, custom.grads),
                        loss_fn="cross_entropy",
                    ),
                )
            except BaseException as exc:
                _settle(gate, exc)
                raise
            _settle(gate, None)
            backward = retrieve(
                transport,
                bwd_id,
                cancelled,
                on_json=_json_only("forward_backward"),
                on_proto=decode_forward_backward_output,
                request_type="ForwardBackward",
            )
            return merge_metrics(backward, custom)

        try:
            future = APIFuture(self._holder.executor, work, request_id=fwd_id)
        except BaseException as exc:  # e.g. the client was closed: never leave the gate open
            _settle(gate, exc)
            raise

        def on_done(done: concurrent.futures.Future[ForwardBackwardOutput]) -> None:
            # Cancelled before the backward pass was submitted: later requests must not wait forever.
            _settle(gate, concurrent.futures.CancelledError())

        future.future().add_done_callback(on_done)
        return future

    async def forward_backward_custom_async(
        self,
        data: Sequence[Datum],
        loss_fn: CustomLossFn,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[ForwardBackwardOutput]:
        """Async twin of :meth:`forward_backward_custom`."""
        return await self._thread(
            self.forward_backward_custom, data, loss_fn, loss_type_input=loss_type_input
        )

    def optim_step(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients (the server adds the DP noise here)."""
        params = adam_params or optim_params or AdamParams()
        return self._submit(
            "api/v1/optim_step",
            "OptimStep",
            lambda seq: wire_body(
                OptimStepRequest, model_id=self.model_id, seq_id=seq, adam_params=params, type="optim_step"
            ),
            on_json=json_result(OptimStepResponse),
        )

    async def optim_step_async(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Async twin of :meth:`optim_step`."""
        return await self._thread(self.optim_step, optim_params, adam_params=adam_params)

    # -- server-side Poisson sampling (TenSafe) ------------------------------------------

    def register_dataset(self, data: Sequence[Datum]) -> APIFuture[RegisterDatasetResponse]:
        """Register the run's training set, once, for server-side Poisson sampling.

        The run must have been created with ``user_metadata={"tensafe.dp.sampling":
        "server_poisson"}``; ``N`` (``tensafe.dp.dataset_size``) is then the number of
        examples registered here. The server keeps the data set encrypted under the
        tenant's key and draws every batch of :meth:`train_step` from it.
        """
        data = [d if isinstance(d, Datum) else Datum.model_validate(d) for d in data]
        return self._submit(
            "api/v1/tensafe/register_dataset",
            "RegisterDataset",
            lambda seq: encode_forward_backward_request(
                model_id=self.model_id,
                seq_id=seq,
                data=data,
                loss_fn="cross_entropy",
                loss_fn_config=None,
                forward_only=True,
            ),
            on_json=json_result(RegisterDatasetResponse),
        )

    async def register_dataset_async(self, data: Sequence[Datum]) -> APIFuture[RegisterDatasetResponse]:
        """Async twin of :meth:`register_dataset`."""
        return await self._thread(self.register_dataset, data)

    def train_step(
        self,
        loss_fn: str,
        adam_params: AdamParams,
        *,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[TrainStepResponse]:
        """Run one full DP step on the server: Poisson batch, forward_backward, optim_step.

        The engine draws the batch from the registered data set (see
        :meth:`register_dataset`), so the certificate states Poisson sampling performed by
        the engine.
        """
        return self._submit(
            "api/v1/tensafe/train_step",
            "TrainStep",
            lambda seq: wire_body(
                TrainStepRequest,
                model_id=self.model_id,
                seq_id=seq,
                loss_fn=loss_fn,
                loss_fn_config=None if loss_fn_config is None else dict(loss_fn_config),
                adam_params=adam_params,
                type="train_step",
                exclude_none=False,
            ),
            on_json=json_result(TrainStepResponse),
        )

    async def train_step_async(
        self,
        loss_fn: str,
        adam_params: AdamParams,
        *,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[TrainStepResponse]:
        """Async twin of :meth:`train_step`."""
        return await self._thread(self.train_step, loss_fn, adam_params, loss_fn_config=loss_fn_config)

    # -- checkpoints ---------------------------------------------------------------------

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:
        """Save weights and optimizer state (encrypted) as ``tinker://<run>/weights/<name>``."""

        def build(seq: int) -> dict[str, Any]:
            return wire_body(
                SaveWeightsRequest,
                model_id=self.model_id,
                path=name,
                seq_id=seq,
                overwrite=overwrite,
                ttl_seconds=ttl_seconds,
                user_metadata=user_metadata,
                type="save_weights",
            )

        return self._submit(
            "api/v1/save_weights", "SaveWeights", build, on_json=json_result(SaveWeightsResponse)
        )

    async def save_state_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[SaveWeightsResponse]:
        """Async twin of :meth:`save_state`."""
        return await self._thread(self.save_state, name, ttl_seconds, overwrite, user_metadata)

    def _load(self, path: str, optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        return self._submit(
            "api/v1/load_weights",
            "LoadWeights",
            lambda seq: wire_body(
                LoadWeightsRequest,
                model_id=self.model_id,
                seq_id=seq,
                path=path,
                optimizer=optimizer,
                type="load_weights",
            ),
            on_json=json_result(LoadWeightsResponse),
        )

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load the weights (not the optimizer state) of a ``tinker://.../weights/...`` path."""
        return self._load(path, False)

    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Async twin of :meth:`load_state`."""
        return await self._thread(self.load_state, path)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Load the weights and the optimizer state of a saved state."""
        return self._load(path, True)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        """Async twin of :meth:`load_state_with_optimizer`."""
        return await self._thread(self.load_state_with_optimizer, path)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Save sampler weights as ``tinker://<run>/sampler_weights/<name>``."""

        def build(seq: int) -> dict[str, Any]:
            return wire_body(
                SaveWeightsForSamplerRequest,
                model_id=self.model_id,
                path=name,
                kind="snapshot",
                seq_id=seq,
                ttl_seconds=ttl_seconds,
                user_metadata=user_metadata,
                type="save_weights_for_sampler",
            )

        return self._submit(
            "api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            build,
            on_json=json_result(SaveWeightsForSamplerResponse),
        )

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Async twin of :meth:`save_weights_for_sampler`."""
        return await self._thread(self.save_weights_for_sampler, name, ttl_seconds, user_metadata)

    def save_weights_external(
        self,
        name: str,
        ttl_seconds: int | None = None,
        age_encryption_recipients: list[str] | None = None,
    ) -> APIFuture[SaveWeightsExternalResponse]:
        """Export the adapter in PEFT format as ``tinker://<run>/external_weights/<name>``.

        The export holds ``adapter_model.safetensors`` and ``adapter_config.json`` (plus
        ``dp_certificate.json`` for a run trained with DP), stored encrypted on the server;
        download it with ``RestClient.get_external_weights_urls``.

        Args:
            name: The checkpoint name (letters, digits, ``.``, ``_``, ``-``).
            ttl_seconds: Expire the export after this many seconds (3600 s to 10 years);
                ``None``: never.
            age_encryption_recipients: Up to 10 age recipients (``age1...`` X25519 keys or
                ``ssh-ed25519``/``ssh-rsa`` public keys); every file is then age-encrypted to
                them and named ``<file>.age``. ``None``: the files are downloaded in clear
                (over the transport's TLS).
        """
        recipients = (
            None if age_encryption_recipients is None else [str(r) for r in age_encryption_recipients]
        )

        def build(seq: int) -> dict[str, Any]:
            return wire_body(
                SaveWeightsExternalRequest,
                model_id=self.model_id,
                path=name,
                seq_id=seq,
                ttl_seconds=ttl_seconds,
                age_encryption_recipients=recipients,
                type="save_weights_external",
            )

        return self._submit(
            "api/v1/save_weights_external",
            "SaveWeightsExternal",
            build,
            on_json=json_result(SaveWeightsExternalResponse),
        )

    async def save_weights_external_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        age_encryption_recipients: list[str] | None = None,
    ) -> APIFuture[SaveWeightsExternalResponse]:
        """Async twin of :meth:`save_weights_external`."""
        return await self._thread(self.save_weights_external, name, ttl_seconds, age_encryption_recipients)

    def save_weights_and_get_sampling_client(
        self, name: str | None = None, *, record_stability_info: bool = False
    ) -> APIFuture[SamplingClient]:
        """Snapshot the current weights and return a future of a SamplingClient on them.

        Args:
            name: Ignored (kept for compatibility with the Tinker SDK).
            record_stability_info: Every sample of the client records stability
                information for its sequences, which ``stable_reinforce`` training
                references by ``SampledSequence.sequence_id`` (``Datum.with_provenance``).
        """
        from tensafe.client._sampling import SamplingClient

        holder = self._holder
        sampler_seq = holder.next_sampler_seq()
        future = self._submit(
            "api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            lambda seq: wire_body(
                SaveWeightsForSamplerRequest,
                model_id=self.model_id,
                sampling_session_seq_id=sampler_seq,
                kind="snapshot",
                seq_id=seq,
                type="save_weights_for_sampler",
            ),
            on_json=json_result(SaveWeightsForSamplerResponse),
        )

        def finish() -> SamplingClient:
            answer = future.result()
            if answer.sampling_session_id is None:
                raise APIResponseValidationError("save_weights_for_sampler returned no sampling_session_id")
            base = self.get_info().model_data.model_name or ""
            return SamplingClient(
                holder,
                answer.sampling_session_id,
                base_model=base,
                record_stability_info=record_stability_info,
            )

        return holder.run(finish)

    async def save_weights_and_get_sampling_client_async(
        self, name: str | None = None, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Async twin of :meth:`save_weights_and_get_sampling_client` (returns the client)."""
        future = await self._thread(
            self.save_weights_and_get_sampling_client, name, record_stability_info=record_stability_info
        )
        return await future

    def create_sampling_client(
        self, model_path: str, *, record_stability_info: bool = False
    ) -> SamplingClient:
        """Return a SamplingClient on saved sampler weights (``tinker://.../sampler_weights/...``).

        ``record_stability_info`` as in :meth:`save_weights_and_get_sampling_client`.
        """
        from tensafe.client._sampling import create_sampling_client

        return create_sampling_client(
            self._holder, model_path=model_path, record_stability_info=record_stability_info
        )

    # -- information ---------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        """Describe the run: base model, LoRA rank, tokenizer id (cached after the first call)."""
        if self._info is None:
            self._info = self._holder.transport.call(
                "POST",
                "api/v1/get_info",
                GetInfoResponse,
                json=wire_body(GetInfoRequest, model_id=self.model_id, type="get_info"),
            )
        return self._info

    async def get_info_async(self) -> GetInfoResponse:
        """Async twin of :meth:`get_info`."""
        return await self._thread(self.get_info)

    def get_tokenizer(self) -> Any:
        """Load the run's tokenizer with ``transformers`` (imported only by this call).

        The server names the tokenizer by a path or a Hugging Face id
        (``get_info().model_data.tokenizer_id``); it must resolve on this machine.
        """
        info = self.get_info()
        tokenizer_id = info.model_data.tokenizer_id or info.model_data.model_name
        if not tokenizer_id:
            raise APIResponseValidationError("the server did not name a tokenizer for this run")
        return load_tokenizer(tokenizer_id)

    def get_privacy(self) -> PrivacyReport:
        """Return the run's privacy budget: ε spent, target ε, δ, accountant, steps."""
        response = self._holder.transport.request(
            "GET", f"api/v1/tensafe/training_runs/{quote(self.model_id, safe=':')}/privacy"
        )
        return parse(PrivacyReport, response)

    async def get_privacy_async(self) -> PrivacyReport:
        """Async twin of :meth:`get_privacy`."""
        return await self._thread(self.get_privacy)

    def get_certificate(self) -> dict[str, Any]:
        """Return the run's DP certificate (a JSON object, see ``docs/privacy.md``)."""
        response = self._holder.transport.request(
            "GET", f"api/v1/tensafe/training_runs/{quote(self.model_id, safe=':')}/certificate"
        )
        body = response.json()
        if not isinstance(body, dict):
            raise APIResponseValidationError("the certificate is not a JSON object")
        return body

    async def get_certificate_async(self) -> dict[str, Any]:
        """Async twin of :meth:`get_certificate`."""
        return await self._thread(self.get_certificate)
