"""Wire types of the Tinker-compatible training API (layer 0): one definition, both sides.

Every JSON body the server accepts or answers, every future result, the prompt and
training-data types and the ``tinker://`` path are defined here, once; the server
validates with these classes and the SDK (:mod:`tensafe.client.types` re-exports them
under the Tinker SDK's names) builds and parses with the same ones.

Strictness is chosen at validation time, not by a second class (see
:mod:`tensafe.protocol._base`):

* **strict on the server**: request models (:class:`WireRequest`) refuse unknown fields
  (HTTP 422), as the official ``tinker==0.38.0`` SDK never sends one; they accept the
  ``type`` discriminator literal the SDK adds to most bodies;
* **lenient in the SDK**: the SDK validates every answer with :func:`parse_lenient` /
  :func:`parse_lenient_json` (context :data:`LENIENT`), which drop unknown fields at every
  depth, so that a newer server can add fields without breaking an older SDK. Response
  models (:class:`WireResponse`) ignore unknown fields everywhere.

The SDK builds every JSON request as an instance of the request model here and sends
``model_dump(mode="json", exclude_none=True)`` of it. Forward/backward bodies and sample
results are protobuf (:mod:`tensafe.protocol.wire`). The protocol is described in
``docs/server.md`` and ``docs/sdk.md``; this package imports only pydantic, NumPy and
protobuf (never torch or the server).
"""

from __future__ import annotations

from tensafe.protocol._base import (
    LENIENT,
    WireModel,
    WireRequest,
    WireResponse,
    parse_lenient,
    parse_lenient_json,
)
from tensafe.protocol._data import (
    Datum,
    EncodedTextChunk,
    MediaChunk,
    ModelInput,
    ModelInputChunk,
    PromptProvenanceSpan,
    ProvenanceSpan,
    ProvenanceSpans,
    SampledProvenanceSpan,
    TensorData,
)
from tensafe.protocol._models import (
    API_KEY_PREFIX,
    AdamParams,
    ApiError,
    Checkpoint,
    CheckpointName,
    CheckpointsListResponse,
    ClientConfigRequest,
    CreateModelRequest,
    CreateModelResponse,
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    Cursor,
    FinishReason,
    FinishSessionRequest,
    ForwardBackwardOutput,
    FutureFailed,
    GetInfoRequest,
    GetInfoResponse,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoadWeightsRequest,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    ModelInputBody,
    OptimizerConfig,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    RegisterDatasetResponse,
    RetrieveFutureRequest,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplerInfo,
    SamplingParams,
    SaveWeightsExternalResponse,
    SaveWeightsForSamplerRequest,
    SaveWeightsForSamplerResponse,
    SaveWeightsRequest,
    SaveWeightsResponse,
    ServerCapabilities,
    SessionHeartbeatRequest,
    SupportedModel,
    TelemetryRequest,
    TrainingRun,
    TrainingRunsResponse,
    TrainStepRequest,
    TrainStepResponse,
    TryAgain,
    UntypedFuture,
    WeightsInfoRequest,
    WeightsInfoResponse,
    model_id_for,
)
from tensafe.protocol.errors import (
    InvalidTinkerPathError,
    ProtocolError,
)
from tensafe.protocol.paths import (
    CHECKPOINT_KINDS,
    KIND_OF_CHECKPOINT_TYPE,
    TINKER_PATH_PREFIX,
    CheckpointKind,
    CheckpointType,
    TinkerPath,
)

__all__ = [
    "API_KEY_PREFIX",
    "CHECKPOINT_KINDS",
    "KIND_OF_CHECKPOINT_TYPE",
    "LENIENT",
    "TINKER_PATH_PREFIX",
    "AdamParams",
    "ApiError",
    "Checkpoint",
    "CheckpointKind",
    "CheckpointName",
    "CheckpointType",
    "CheckpointsListResponse",
    "ClientConfigRequest",
    "CreateModelRequest",
    "CreateModelResponse",
    "CreateSamplingSessionRequest",
    "CreateSamplingSessionResponse",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "FinishReason",
    "FinishSessionRequest",
    "ForwardBackwardOutput",
    "FutureFailed",
    "GetInfoRequest",
    "GetInfoResponse",
    "GetSamplerResponse",
    "GetSessionResponse",
    "InvalidTinkerPathError",
    "ListSessionsResponse",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "LoraConfig",
    "MediaChunk",
    "ModelData",
    "ModelInput",
    "ModelInputBody",
    "ModelInputChunk",
    "OptimStepRequest",
    "OptimStepResponse",
    "OptimizerConfig",
    "ParsedCheckpointTinkerPath",
    "PromptProvenanceSpan",
    "ProtocolError",
    "ProvenanceSpan",
    "ProvenanceSpans",
    "RegisterDatasetResponse",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplerInfo",
    "SamplingParams",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerRequest",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsRequest",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "SessionHeartbeatRequest",
    "SupportedModel",
    "TelemetryRequest",
    "TensorData",
    "TinkerPath",
    "TrainStepRequest",
    "TrainStepResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "TryAgain",
    "UntypedFuture",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
    "WireModel",
    "WireRequest",
    "WireResponse",
    "model_id_for",
    "parse_lenient",
    "parse_lenient_json",
]
