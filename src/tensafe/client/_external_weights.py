"""``RestClient``'s bring-your-own-adapter and checkpoint-search calls (Tinker 0.39's names).

Mixed into :class:`tensafe.client.RestClient`: ``external_weights_upload_start``,
``external_weights_upload_finish``, the convenience :meth:`ExternalWeightsCalls.upload_adapter`
(start, one ``PUT`` per file, finish) and ``search_checkpoints``. Wire models:
:mod:`tensafe.protocol.external_weights`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tensafe.client._futures import APIFuture
from tensafe.client._http import Transport
from tensafe.protocol import LoraConfig
from tensafe.protocol.external_weights import (
    ADAPTER_FILES,
    CheckpointSearchRequest,
    CheckpointSearchResponse,
    ExternalWeightsUploadFinishRequest,
    ExternalWeightsUploadFinishResponse,
    ExternalWeightsUploadStartRequest,
    ExternalWeightsUploadStartResponse,
)

__all__ = ["ExternalWeightsCalls"]

T = TypeVar("T")


def _adapter_files(source: str | os.PathLike[str] | Mapping[str, bytes]) -> dict[str, bytes]:
    """The two adapter files from a directory or a ``{name: bytes}`` mapping.

    Raises:
        ValueError: A file is missing, or the mapping has other files.
    """
    if isinstance(source, Mapping):
        files = {str(k): bytes(v) for k, v in source.items()}
        if set(files) != set(ADAPTER_FILES):
            raise ValueError(
                f"upload_adapter needs exactly the files {list(ADAPTER_FILES)}, got {sorted(files)}"
            )
        return files
    directory = Path(source)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory} is not a PEFT adapter directory: {', '.join(missing)} missing")
    return {name: (directory / name).read_bytes() for name in ADAPTER_FILES}


class ExternalWeightsCalls:
    """The calls; the class that mixes them in provides ``_transport`` and ``_future``."""

    _transport: Transport
    _future: Callable[[Callable[[], Any]], APIFuture[Any]]

    def _upload_start(self, request: ExternalWeightsUploadStartRequest) -> ExternalWeightsUploadStartResponse:
        return self._transport.call(
            "POST",
            "api/v1/external_weights_upload_start",
            ExternalWeightsUploadStartResponse,
            json=request.model_dump(mode="json", exclude_none=True),
        )

    def external_weights_upload_start(
        self, request: ExternalWeightsUploadStartRequest
    ) -> APIFuture[ExternalWeightsUploadStartResponse]:
        """Start an upload: an ``upload_id`` and one single-use ``PUT`` URL per adapter file."""
        return self._future(lambda: self._upload_start(request))

    async def external_weights_upload_start_async(
        self, request: ExternalWeightsUploadStartRequest
    ) -> ExternalWeightsUploadStartResponse:
        """Async twin of :meth:`external_weights_upload_start`."""
        return await asyncio.to_thread(self._upload_start, request)

    def _upload_finish(self, upload_id: str) -> ExternalWeightsUploadFinishResponse:
        body = ExternalWeightsUploadFinishRequest(upload_id=upload_id)
        return self._transport.call(
            "POST",
            "api/v1/external_weights_upload_finish",
            ExternalWeightsUploadFinishResponse,
            json=body.model_dump(mode="json", exclude_none=True),
        )

    def external_weights_upload_finish(
        self, upload_id: str
    ) -> APIFuture[ExternalWeightsUploadFinishResponse]:
        """Finish an upload: the server verifies the files; the answer holds the ``tinker_path``."""
        return self._future(lambda: self._upload_finish(upload_id))

    async def external_weights_upload_finish_async(
        self, upload_id: str
    ) -> ExternalWeightsUploadFinishResponse:
        """Async twin of :meth:`external_weights_upload_finish`."""
        return await asyncio.to_thread(self._upload_finish, upload_id)

    def _upload(self, files: dict[str, bytes], request: ExternalWeightsUploadStartRequest) -> str:
        started = self._upload_start(request)
        for name in ADAPTER_FILES:
            url = started.urls.get(name)
            if url is None:
                raise ValueError(f"the server issued no upload URL for {name}")
            # The URL is on the server's own origin: the transport refuses any other (API key).
            self._transport.request(
                "PUT", url, content=files[name], headers={"Content-Type": "application/octet-stream"}
            )
        return self._upload_finish(started.upload_id).tinker_path

    def upload_adapter(
        self,
        dir_or_files: str | os.PathLike[str] | Mapping[str, bytes],
        *,
        base_model: str,
        rank: int,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
    ) -> APIFuture[str]:
        """Upload a PEFT LoRA adapter (start, one ``PUT`` per file, finish); the result is its path.

        Args:
            dir_or_files: An adapter directory (``adapter_config.json``,
                ``adapter_model.safetensors``) or those two files as ``{name: bytes}``.
            base_model: The base model it was trained on, as this server names it.
            rank: Its LoRA rank (``r``).
            train_mlp: Whether it may adapt the MLP projections.
            train_attn: Whether it may adapt the attention projections.
            train_unembed: Whether it may adapt ``lm_head``.

        Raises:
            ValueError: (at once) the files are missing.
        """
        files = _adapter_files(dir_or_files)
        request = ExternalWeightsUploadStartRequest(
            base_model=base_model,
            lora_config=LoraConfig(
                rank=rank, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
            ),
        )
        return self._future(lambda: self._upload(files, request))

    def _search(self, request: CheckpointSearchRequest) -> CheckpointSearchResponse:
        return self._transport.call(
            "POST",
            "api/v1/checkpoints/search",
            CheckpointSearchResponse,
            json=request.model_dump(mode="json", exclude_none=True),
        )

    def search_checkpoints(self, request: CheckpointSearchRequest) -> APIFuture[CheckpointSearchResponse]:
        """Your checkpoints by ``user_metadata``, type and base model, newest first (one page)."""
        return self._future(lambda: self._search(request))

    async def search_checkpoints_async(self, request: CheckpointSearchRequest) -> CheckpointSearchResponse:
        """Async twin of :meth:`search_checkpoints`."""
        return await asyncio.to_thread(self._search, request)
