"""Wire models of the Tinker-compatible training API (layer 0, shared by SDK and server).

Request models are strict (``extra="forbid"``): a field the official ``tinker==0.38.0``
SDK does not send is refused with a 422 rather than silently ignored. They accept the
``type`` discriminator literal the SDK adds to most bodies. Response models are
tolerant (``extra="ignore"``) so that a newer server can add fields. The protocol is
described in ``docs/server.md``; this package imports nothing but pydantic.
"""

from __future__ import annotations

from tensafe.protocol._models import (
    API_KEY_PREFIX,
    AdamParams,
    ApiError,
    Checkpoint,
    CheckpointsListResponse,
    ClientConfigRequest,
    CreateModelRequest,
    CreateModelResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    Cursor,
    FinishReason,
    FinishSessionRequest,
    FutureFailed,
    GetInfoRequest,
    GetInfoResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoraConfig,
    ModelData,
    OptimizerConfig,
    OptimStepRequest,
    RetrieveFutureRequest,
    ServerCapabilities,
    SessionHeartbeatRequest,
    SupportedModel,
    TelemetryRequest,
    TrainingRun,
    TrainingRunsResponse,
    TryAgain,
    UntypedFuture,
    model_id_for,
)

__all__ = [
    "API_KEY_PREFIX",
    "AdamParams",
    "ApiError",
    "Checkpoint",
    "CheckpointsListResponse",
    "ClientConfigRequest",
    "CreateModelRequest",
    "CreateModelResponse",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "Cursor",
    "FinishReason",
    "FinishSessionRequest",
    "FutureFailed",
    "GetInfoRequest",
    "GetInfoResponse",
    "GetSessionResponse",
    "ListSessionsResponse",
    "LoraConfig",
    "ModelData",
    "OptimStepRequest",
    "OptimizerConfig",
    "RetrieveFutureRequest",
    "ServerCapabilities",
    "SessionHeartbeatRequest",
    "SupportedModel",
    "TelemetryRequest",
    "TrainingRun",
    "TrainingRunsResponse",
    "TryAgain",
    "UntypedFuture",
    "model_id_for",
]
