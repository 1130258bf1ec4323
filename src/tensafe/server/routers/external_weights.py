"""Bring your own adapter (Tinker 0.39's external weights upload) and checkpoint search.

* ``POST /api/v1/external_weights_upload_start``: an upload id and one signed, expiring,
  single-use ``PUT`` URL per adapter file;
* ``PUT /api/v1/external_weights_uploads/{upload_id}/{file}?expires=...&signature=...``: one
  file (the tenant's API key is required too, and must be the tenant that started the upload);
* ``POST /api/v1/external_weights_upload_finish``: verification, then the ``tinker://`` path of
  the new ``external_weights`` checkpoint;
* ``POST /api/v1/checkpoints/search``: the caller's checkpoints by metadata, type and base model
  (the path is TenSafe's choice; Tinker's published excerpts do not name it).

The work is done in :mod:`tensafe.server.external_weights`.
"""

# No "from __future__ import annotations": FastAPI evaluates the annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from tensafe.protocol import external_weights as xw
from tensafe.server import external_weights as xws
from tensafe.server.deps import Caller, Svc

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["external_weights"])


@router.post("/external_weights_upload_start")
def external_weights_upload_start(
    body: xw.ExternalWeightsUploadStartRequest, who: Caller, services: Svc, request: Request
) -> xw.ExternalWeightsUploadStartResponse:
    """Start uploading a PEFT LoRA adapter trained elsewhere (one ``PUT`` URL per file)."""
    return xws.start_upload(services, who, body, base_url=str(request.base_url))


@router.put("/external_weights_uploads/{upload_id}/{file_name}")
async def external_weights_upload_file(
    upload_id: str,
    file_name: str,
    expires: Annotated[int, Query(ge=0, le=2**40)],
    signature: Annotated[str, Query(max_length=128)],
    who: Caller,
    services: Svc,
    request: Request,
) -> dict[str, Any]:
    """Receive one file of an upload (single-use URL; the body is limited as it streams)."""
    data = await request.body()
    return await run_in_threadpool(
        xws.receive_file,
        services,
        who,
        upload_id=upload_id,
        file_name=file_name,
        expires=expires,
        signature=signature,
        data=data,
    )


@router.post("/external_weights_upload_finish")
def external_weights_upload_finish(
    body: xw.ExternalWeightsUploadFinishRequest, who: Caller, services: Svc
) -> xw.ExternalWeightsUploadFinishResponse:
    """Verify the uploaded adapter and store it as a non-private ``external_weights`` checkpoint."""
    return xws.finish_upload(services, who, body.upload_id)


@router.post("/checkpoints/search", tags=["rest"])
def search_checkpoints(
    body: xw.CheckpointSearchRequest, who: Caller, services: Svc
) -> xw.CheckpointSearchResponse:
    """The caller's live checkpoints matching every filter, newest first, paginated by cursor."""
    return xws.search_checkpoints(services, who, body)
