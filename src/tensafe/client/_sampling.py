"""``SamplingClient``: sampling and prompt scoring on a sampling session."""

from __future__ import annotations

import asyncio
import threading
from typing import Any
from urllib.parse import quote

from tensafe.client._exceptions import APIResponseValidationError
from tensafe.client._futures import APIFuture, retrieve
from tensafe.client._holder import Holder
from tensafe.client._requests import wire_body
from tensafe.client._tokenizer import load_tokenizer
from tensafe.client._wire import decode_sample_response
from tensafe.client.types import ModelInput, SampleResponse, SamplingParams
from tensafe.protocol import (
    TINKER_PATH_PREFIX,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    SampleRequest,
    SamplerInfo,
    UntypedFuture,
)

__all__ = ["SamplingClient", "create_sampling_client"]


def _reject_json(_body: dict[str, Any]) -> Any:
    raise APIResponseValidationError("the server sent a JSON sample result; expected protobuf")


class SamplingClient:
    """Samples from a base model or saved weights (a server-side sampling session)."""

    def __init__(
        self,
        holder: Holder,
        sampling_session_id: str,
        *,
        base_model: str,
        model_path: str | None = None,
        record_stability_info: bool = False,
    ) -> None:
        """Bind to a sampling session (use ``ServiceClient.create_sampling_client``).

        With ``record_stability_info``, every sample asks the server to record stability
        information for its sequences (``stable_reinforce`` training references them by
        ``SampledSequence.sequence_id``; tenant-scoped, they expire after a day unused).
        """
        self._holder = holder
        self.sampling_session_id = sampling_session_id
        self.base_model = base_model
        self.model_path = model_path
        self.record_stability_info = record_stability_info
        self._seq = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"SamplingClient(sampling_session_id={self.sampling_session_id!r}, "
            f"record_stability_info={self.record_stability_info})"
        )

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> APIFuture[SampleResponse]:
        """Sample ``num_samples`` completions of ``prompt``.

        Returns:
            A future of the sequences (tokens, logprobs, stop reason, and the
            ``sequence_id`` the server assigned when the request was submitted) and, with
            ``include_prompt_logprobs``, the prompt's logprobs. The request carries this
            client's ``record_stability_info``.
        """
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
        body = wire_body(
            SampleRequest,
            num_samples=num_samples,
            prompt=prompt,
            sampling_params=sampling_params,
            sampling_session_id=self.sampling_session_id,
            seq_id=seq,
            prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            topk_sample_logprobs=topk_sample_logprobs,
            prompt_alt_tokens_k=0,
            record_stability_info=self.record_stability_info,
            type="sample",
        )
        transport = self._holder.transport
        answer = transport.call(
            "POST",
            "api/v1/asample",
            UntypedFuture,
            json=body,
            headers={"X-Tinker-Sampling-Backpressure": "1"},
        )
        ids = answer.sample_sequence_ids
        if ids is None or len(ids) != num_samples:
            raise APIResponseValidationError(
                f"the server's asample answer carries {0 if ids is None else len(ids)} sample_sequence_ids "
                f"for {num_samples} samples"
            )

        def decode(data: bytes) -> SampleResponse:
            response = decode_sample_response(data, ids)
            if len(response.sequences) != num_samples:
                raise APIResponseValidationError(
                    f"asked for {num_samples} samples, the server returned {len(response.sequences)}"
                )
            return response

        return APIFuture(
            self._holder.executor,
            lambda cancelled: retrieve(
                transport,
                answer.request_id,
                cancelled,
                on_json=_reject_json,
                on_proto=decode,
                request_type="Sample",
            ),
            request_id=answer.request_id,
        )

    async def sample_async(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
    ) -> SampleResponse:
        """Async twin of :meth:`sample` (returns the response)."""
        future = await asyncio.to_thread(
            self.sample,
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
        )
        return await future

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        """Return a future of the logprob of every prompt token (``None`` for the first)."""
        inner = self.sample(prompt, 1, SamplingParams(max_tokens=1), include_prompt_logprobs=True)

        def logprobs() -> list[float | None]:
            response = inner.result()
            if response.prompt_logprobs is None:
                raise APIResponseValidationError("the server returned no prompt logprobs")
            return response.prompt_logprobs

        return self._holder.run(logprobs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> list[float | None]:
        """Async twin of :meth:`compute_logprobs` (returns the logprobs)."""
        future = await asyncio.to_thread(self.compute_logprobs, prompt)
        return await future

    def get_base_model(self) -> str:
        """The base model this session samples from."""
        return self.base_model

    def get_tokenizer(self) -> Any:
        """Load the base model's tokenizer with ``transformers`` (imported only by this call)."""
        return load_tokenizer(self.base_model)


def create_sampling_client(
    holder: Holder,
    *,
    model_path: str | None = None,
    base_model: str | None = None,
    record_stability_info: bool = False,
) -> SamplingClient:
    """Open a sampling session on saved sampler weights or on a base model.

    ``record_stability_info`` is a property of the returned client, sent with each of its
    samples (as the Tinker SDK does), not of the session.
    """
    if model_path is None and base_model is None:
        raise ValueError("pass model_path (tinker://...) or base_model")
    if model_path is not None and not model_path.startswith(TINKER_PATH_PREFIX):
        raise ValueError("model_path must be a tinker:// path")
    body = wire_body(
        CreateSamplingSessionRequest,
        session_id=holder.session_id,
        sampling_session_seq_id=holder.next_sampler_seq(),
        model_path=model_path,
        base_model=base_model,
        type="create_sampling_session",
    )
    answer = holder.transport.call(
        "POST", "api/v1/create_sampling_session", CreateSamplingSessionResponse, json=body
    )
    session_id = answer.sampling_session_id
    if base_model is None:
        sampler = holder.transport.call("GET", f"api/v1/samplers/{quote(session_id, safe=':')}", SamplerInfo)
        base_model = sampler.base_model
    return SamplingClient(
        holder,
        session_id,
        base_model=base_model,
        model_path=model_path,
        record_stability_info=record_stability_info,
    )
