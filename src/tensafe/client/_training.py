"""``TrainingClient``: forward/backward, optimizer steps, checkpoints, privacy of one run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from tensafe.client._exceptions import APIResponseValidationError
from tensafe.client._futures import APIFuture, retrieve
from tensafe.client._holder import Holder
from tensafe.client._http import parse
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
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    TrainStepResponse,
)
from tensafe.protocol import UntypedFuture

if TYPE_CHECKING:
    from tensafe.client._sampling import SamplingClient

__all__ = ["TrainingClient"]

T = TypeVar("T")


def _json_only(what: str) -> Callable[[dict[str, Any]], Any]:
    def reject(_body: dict[str, Any]) -> Any:
        raise APIResponseValidationError(f"the server sent a JSON {what} result; expected protobuf")

    return reject


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

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _submit(
        self,
        path: str,
        request_type: str,
        build: Callable[[int], dict[str, Any] | bytes],
        *,
        on_json: Callable[[dict[str, Any]], T],
        on_proto: Callable[[bytes], T] | None = None,
    ) -> APIFuture[T]:
        transport = self._holder.transport
        with self._submit_lock:
            self._seq += 1
            body = build(self._seq)
            if isinstance(body, bytes):
                answer = transport.call(
                    "POST",
                    path,
                    UntypedFuture,
                    content=body,
                    headers={"Content-Type": "application/x-protobuf"},
                )
            else:
                answer = transport.call("POST", path, UntypedFuture, json=body)
        request_id = answer.request_id
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
            loss_fn: ``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo`` or ``dro``.
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

    def optim_step(
        self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None
    ) -> APIFuture[OptimStepResponse]:
        """Apply the accumulated gradients (the server adds the DP noise here)."""
        params = adam_params or optim_params or AdamParams()
        return self._submit(
            "api/v1/optim_step",
            "OptimStep",
            lambda seq: {
                "model_id": self.model_id,
                "seq_id": seq,
                "adam_params": params.model_dump(mode="json"),
                "type": "optim_step",
            },
            on_json=OptimStepResponse.model_validate,
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
            on_json=RegisterDatasetResponse.model_validate,
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
            lambda seq: {
                "model_id": self.model_id,
                "seq_id": seq,
                "loss_fn": loss_fn,
                "loss_fn_config": None if loss_fn_config is None else dict(loss_fn_config),
                "adam_params": adam_params.model_dump(mode="json"),
                "type": "train_step",
            },
            on_json=TrainStepResponse.model_validate,
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
            body: dict[str, Any] = {
                "model_id": self.model_id,
                "path": name,
                "seq_id": seq,
                "overwrite": overwrite,
                "type": "save_weights",
            }
            if ttl_seconds is not None:
                body["ttl_seconds"] = ttl_seconds
            if user_metadata is not None:
                body["user_metadata"] = user_metadata
            return body

        return self._submit(
            "api/v1/save_weights", "SaveWeights", build, on_json=SaveWeightsResponse.model_validate
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
            lambda seq: {
                "model_id": self.model_id,
                "seq_id": seq,
                "path": path,
                "optimizer": optimizer,
                "type": "load_weights",
            },
            on_json=LoadWeightsResponse.model_validate,
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
            body: dict[str, Any] = {
                "model_id": self.model_id,
                "path": name,
                "kind": "snapshot",
                "seq_id": seq,
                "type": "save_weights_for_sampler",
            }
            if ttl_seconds is not None:
                body["ttl_seconds"] = ttl_seconds
            if user_metadata is not None:
                body["user_metadata"] = user_metadata
            return body

        return self._submit(
            "api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            build,
            on_json=SaveWeightsForSamplerResponse.model_validate,
        )

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[SaveWeightsForSamplerResponse]:
        """Async twin of :meth:`save_weights_for_sampler`."""
        return await self._thread(self.save_weights_for_sampler, name, ttl_seconds, user_metadata)

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> APIFuture[SamplingClient]:
        """Snapshot the current weights and return a future of a SamplingClient on them.

        Args:
            name: Ignored (kept for compatibility with the Tinker SDK).
        """
        from tensafe.client._sampling import SamplingClient

        holder = self._holder
        sampler_seq = holder.next_sampler_seq()
        future = self._submit(
            "api/v1/save_weights_for_sampler",
            "SaveWeightsForSampler",
            lambda seq: {
                "model_id": self.model_id,
                "sampling_session_seq_id": sampler_seq,
                "kind": "snapshot",
                "seq_id": seq,
                "type": "save_weights_for_sampler",
            },
            on_json=SaveWeightsForSamplerResponse.model_validate,
        )

        def finish() -> SamplingClient:
            answer = future.result()
            if answer.sampling_session_id is None:
                raise APIResponseValidationError("save_weights_for_sampler returned no sampling_session_id")
            base = self.get_info().model_data.model_name or ""
            return SamplingClient(holder, answer.sampling_session_id, base_model=base)

        return holder.run(finish)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        """Async twin of :meth:`save_weights_and_get_sampling_client` (returns the client)."""
        future = await self._thread(self.save_weights_and_get_sampling_client, name)
        return await future

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """Return a SamplingClient on saved sampler weights (``tinker://.../sampler_weights/...``)."""
        from tensafe.client._sampling import create_sampling_client

        return create_sampling_client(self._holder, model_path=model_path)

    # -- information ---------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        """Describe the run: base model, LoRA rank, tokenizer id (cached after the first call)."""
        if self._info is None:
            self._info = self._holder.transport.call(
                "POST",
                "api/v1/get_info",
                GetInfoResponse,
                json={"model_id": self.model_id, "type": "get_info"},
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
