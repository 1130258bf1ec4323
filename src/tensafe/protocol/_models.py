"""Pydantic models of the JSON bodies exchanged with the ``tinker==0.38.0`` SDK.

Requests derive from :class:`~tensafe.protocol._base.WireRequest` (strict, frozen), answers
and future results from :class:`~tensafe.protocol._base.WireResponse`; the SDK parses
every answer with :func:`~tensafe.protocol._base.parse_lenient`. Prompts and training
data are in :mod:`tensafe.protocol._data`.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from tensafe.protocol._base import WireRequest, WireResponse
from tensafe.protocol._data import ModelInput, TensorData
from tensafe.protocol.paths import CheckpointType, TinkerPath

__all__ = [
    "API_KEY_PREFIX",
    "AdamParams",
    "ApiError",
    "Checkpoint",
    "CheckpointName",
    "CheckpointsListResponse",
    "ClientConfigRequest",
    "CreateModelRequest",
    "CreateModelResponse",
    "CreateSamplingSessionRequest",
    "CreateSamplingSessionResponse",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "Cursor",
    "FinishReason",
    "FinishSessionRequest",
    "ForwardBackwardOutput",
    "FutureFailed",
    "GetInfoRequest",
    "GetInfoResponse",
    "GetSamplerResponse",
    "GetSessionResponse",
    "ListSessionsResponse",
    "LoadWeightsRequest",
    "LoadWeightsResponse",
    "LoraConfig",
    "ModelData",
    "ModelInputBody",
    "OptimStepRequest",
    "OptimStepResponse",
    "OptimizerConfig",
    "ParsedCheckpointTinkerPath",
    "RegisterDatasetResponse",
    "RetrieveFutureRequest",
    "SampleRequest",
    "SampleResponse",
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
    "TrainStepRequest",
    "TrainStepResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "TryAgain",
    "UntypedFuture",
    "WeightsInfoRequest",
    "WeightsInfoResponse",
    "model_id_for",
]

#: Every API key starts with this prefix (the SDK refuses other keys before sending).
API_KEY_PREFIX = "tml-"

#: Identifiers that appear in URL paths and ``tinker://`` paths: no ``/``, no whitespace.
Ident = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9:._-]*$")
]
ShortText = Annotated[str, StringConstraints(max_length=200)]
SeqId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def model_id_for(session_id: str, model_seq_id: int) -> str:
    """Return the id of a training model: ``{session_id}:train:{model_seq_id}``.

    The SDK derives this id itself after ``create_training_client_from_state``, so the
    server must name every training model this way.
    """
    return f"{session_id}:train:{model_seq_id}"


_Request = WireRequest
_Response = WireResponse


# --------------------------------------------------------------------------- bootstrap


class ClientConfigRequest(_Request):
    """Body of ``/client/config`` and ``/client/dynamic_config``."""

    sdk_version: ShortText | None = None
    type: str | None = None


class CreateSessionRequest(_Request):
    """Body of ``/create_session``."""

    tags: list[ShortText] = Field(default_factory=list, max_length=100)
    user_metadata: dict[str, Any] | None = None
    sdk_version: ShortText | None = None
    project_id: ShortText | None = None
    display_name: ShortText | None = None
    type: Literal["create_session"] | None = None


class CreateSessionResponse(_Response):
    """Answer of ``/create_session``."""

    session_id: str
    type: Literal["create_session"] = "create_session"
    info_message: str | None = None
    warning_message: str | None = None
    error_message: str | None = None


class SessionHeartbeatRequest(_Request):
    """Body of ``/session_heartbeat``."""

    session_id: Ident
    type: Literal["session_heartbeat"] | None = None


class FinishReason(_Request):
    """Why a client ended its session."""

    type: Literal["success", "errored", "interrupted"]


class FinishSessionRequest(_Request):
    """Body of ``/sessions/{session_id}/finish`` (the SDK sends ``detail: null`` explicitly)."""

    reason: FinishReason
    detail: Annotated[str, StringConstraints(max_length=4000)] | None = None


class TelemetryRequest(_Request):
    """Body of ``/telemetry``; events are accepted as opaque objects and not stored."""

    events: list[dict[str, Any]] = Field(max_length=1000)
    platform: ShortText
    sdk_version: ShortText
    session_id: ShortText
    process_uuid: ShortText


# --------------------------------------------------------------------------- models


class LoraConfig(_Request):
    """LoRA settings of a training model."""

    rank: int = Field(ge=1, le=1024)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(_Request):
    """Optimizer family fixed at model creation (``adamw`` or ``dimuon``)."""

    type: Literal["adamw", "dimuon"] = "adamw"
    version: Literal[1] | None = None


class CreateModelRequest(_Request):
    """Body of ``/create_model``."""

    session_id: Ident
    model_seq_id: SeqId
    base_model: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)
    type: Literal["create_model"] | None = None


class CreateModelResponse(_Response):
    """Result of a ``create_model`` future."""

    model_id: str
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(_Request):
    """Body of ``/get_info``."""

    model_id: Ident
    type: Literal["get_info"] | None = None


class ModelData(_Response):
    """What a client needs to know about the base model (``tokenizer_id`` feeds ``get_tokenizer``)."""

    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(_Response):
    """Answer of ``/get_info``."""

    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    optimizer_config: dict[str, Any] | None = None


class AdamParams(_Request):
    """Per-step Adam(W) hyperparameters (``weight_decay`` is decoupled)."""

    learning_rate: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    grad_clip_norm: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class OptimStepRequest(_Request):
    """Body of ``/optim_step``; Adam models send ``adam_params``, others ``optimizer_params``."""

    model_id: Ident
    seq_id: SeqId
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None
    type: Literal["optim_step"] | None = None


# --------------------------------------------------------------------------- futures


class TrainStepRequest(_Request):
    """Body of ``/api/v1/tensafe/train_step``: one server-sampled DP step (``server_poisson`` runs).

    The engine draws the Poisson batch from the registered data set, runs
    ``forward_backward`` over it with ``loss_fn`` and applies ``optim_step`` with ``adam_params``.
    """

    model_id: Ident
    seq_id: SeqId
    loss_fn: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    loss_fn_config: dict[str, float | str] | None = None
    adam_params: AdamParams
    type: Literal["train_step"] | None = None


class UntypedFuture(_Response):
    """Submit answer of every asynchronous operation."""

    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class RetrieveFutureRequest(_Request):
    """Body of ``/retrieve_future``."""

    request_id: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    allow_metadata_only: bool = False
    type: str | None = None


class TryAgain(_Response):
    """Answer to a poll of a future that is not finished yet (sent with HTTP 408)."""

    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | None = None


class FutureFailed(_Response):
    """Result of a failed future (sent with HTTP 200, as the SDK expects)."""

    error: str
    category: Literal["user", "server", "unknown"]


class ApiError(_Response):
    """JSON body of every 4xx answer of the TenSafe server."""

    error: str
    detail: str
    category: Literal["user", "server", "unknown"] = "user"
    errors: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- REST


class SupportedModel(_Response):
    """One base model the server can train or sample."""

    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None


class ServerCapabilities(_Response):
    """Answer of ``/get_server_capabilities``."""

    supported_models: list[SupportedModel]


class Cursor(_Response):
    """Pagination state of a listing."""

    offset: int
    limit: int
    total_count: int


class Checkpoint(_Response):
    """A saved state or sampler snapshot, addressed by its ``tinker://`` path."""

    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: _dt.datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: _dt.datetime | None = None


class CheckpointsListResponse(_Response):
    """Answer of the checkpoint listings."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class TrainingRun(_Response):
    """A training model as the REST client sees it (its id is the model id)."""

    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: _dt.datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(_Response):
    """Answer of ``GET /training_runs``."""

    training_runs: list[TrainingRun]
    cursor: Cursor


class ListSessionsResponse(_Response):
    """Answer of ``GET /sessions``."""

    sessions: list[str]


class GetSessionResponse(_Response):
    """Answer of ``GET /sessions/{id}``."""

    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, Any] | None = None
    display_name: str | None = None


# --------------------------------------------------------------------------- weights and sampling

#: A checkpoint name: the last part of ``tinker://<run>/<kind>/<name>`` (no ``/``).
CheckpointName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
TinkerPathText = Annotated[str, StringConstraints(min_length=1, max_length=700)]
TtlSeconds = Annotated[int, Field(ge=3600, le=10 * 366 * 86400)]


class SaveWeightsRequest(_Request):
    """``save_state``: the full training state under ``tinker://<model>/weights/<path>``."""

    model_id: Ident
    path: CheckpointName | None = None
    seq_id: SeqId
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] | None = None


class SaveWeightsForSamplerRequest(_Request):
    """Sampler weights: named (``path``) or an ephemeral sampling session."""

    model_id: Ident
    path: CheckpointName | None = None
    sampling_session_seq_id: SeqId | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: SeqId
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class LoadWeightsRequest(_Request):
    """Create a model from a ``weights`` checkpoint (or, legacy, load into an existing one)."""

    model_id: Ident | None = None
    seq_id: SeqId | None = None
    session_id: Ident | None = None
    model_seq_id: SeqId | None = None
    base_model: Annotated[str, StringConstraints(max_length=500)] | None = None
    user_metadata: dict[str, Any] | None = None
    path: TinkerPathText
    optimizer: bool
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: Annotated[str, StringConstraints(max_length=4000)] | None = None
    type: Literal["load_weights"] | None = None


class CreateSamplingSessionRequest(_Request):
    """A sampling session on a base model or on ``sampler_weights``."""

    session_id: Ident
    sampling_session_seq_id: SeqId
    base_model: Annotated[str, StringConstraints(max_length=500)] | None = None
    model_path: TinkerPathText | None = None
    type: Literal["create_sampling_session"] | None = None


class CreateSamplingSessionResponse(_Response):
    """``{"sampling_session_id": ...}``."""

    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SamplerInfo(_Response):
    """``GET /samplers/{id}`` (the SDK's ``GetSamplerResponse``).

    ``sampler_id`` is the sampling session id (``<session>:sample:<n>``); ``model_path`` the
    ``tinker://`` path of the sampler weights, or ``None`` for a sampler on the base model
    or on an ephemeral snapshot.
    """

    sampler_id: str
    base_model: str
    model_path: str | None = None


#: The prompt of ``/asample`` (the SDK's ``ModelInput``; the server's historical name).
ModelInputBody = ModelInput


class SamplingParams(_Request):
    """Sampling settings, sent as JSON (``None`` fields are omitted).

    ``stop`` is a string, a list of strings or a list of token ids; ``None`` stops at EOS and
    ``[]`` never stops early.
    """

    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0


class SampleRequest(_Request):
    """``/asample``: ``num_samples`` completions of ``prompt`` from a sampling session."""

    num_samples: Annotated[int, Field(ge=1, le=128)] = 1
    prompt: ModelInputBody
    sampling_params: SamplingParams
    base_model: Annotated[str, StringConstraints(max_length=500)] | None = None
    model_path: TinkerPathText | None = None
    sampling_session_id: Ident | None = None
    seq_id: Annotated[int, Field(ge=0, le=2**62)] | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Annotated[int, Field(ge=0, le=64)] = 0
    topk_sample_logprobs: Annotated[int, Field(ge=0)] = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: Annotated[int, Field(ge=0)] = 0
    prompt_logprobs_last_n: Annotated[int, Field(ge=1)] | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] | None = None


class WeightsInfoRequest(_Request):
    """``POST /weights_info``."""

    tinker_path: TinkerPathText
    type: str | None = None


class WeightsInfoResponse(_Response):
    """What a checkpoint holds."""

    base_model: str
    is_lora: bool
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: dict[str, Any] | None = None


#: ``GET /samplers/{id}`` under the Tinker SDK's name.
GetSamplerResponse = SamplerInfo


# --------------------------------------------------------------------------- future results


class SaveWeightsResponse(_Response):
    """Result of ``save_state``: ``path`` is ``tinker://<run id>/weights/<name>``."""

    path: str
    type: Literal["save_weights"] | None = None


class SaveWeightsForSamplerResponse(_Response):
    """Result of ``save_weights_for_sampler``: ``path`` (named) or ``sampling_session_id`` (ephemeral)."""

    path: str | None = None
    sampling_session_id: str | None = None
    type: Literal["save_weights_for_sampler"] | None = None


class SaveWeightsExternalResponse(_Response):
    """Result of ``save_weights_external``: ``path`` is ``tinker://<run id>/external_weights/<name>``.

    ``size_bytes`` (a TenSafe addition, optional on the wire) is the total size of the
    exported files.
    """

    path: str
    size_bytes: int | None = None
    type: Literal["save_weights_external"] | None = None


class LoadWeightsResponse(_Response):
    """Result of ``load_weights``: the loaded path and the model it was loaded into."""

    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


class OptimStepResponse(_Response):
    """Result of ``optim_step``: metrics of the step (``name:reduction`` keys), if any."""

    metrics: dict[str, float] | None = None


class RegisterDatasetResponse(_Response):
    """Result of ``register_dataset``: the registered data set's size ``N`` (privacy units)."""

    dataset_size: int


class TrainStepResponse(_Response):
    """Result of ``train_step``: what one server-sampled step released.

    ``metrics`` holds ``grad_norm:mean`` (of the noisy gradient), ``learning_rate:mean`` and
    ``dp_epsilon:max``. The drawn batch's size and loss are not returned: they are
    statistics of the private batch, not covered by the DP guarantee.
    """

    metrics: dict[str, float] | None = None


class ForwardBackwardOutput(_Response):
    """Result of ``forward``/``forward_backward`` (decoded from protobuf by the SDK).

    ``loss_fn_outputs[i]["logprobs"]`` holds datum ``i``'s target logprobs; metric keys look
    like ``name:reduction`` (``loss:sum``).
    """

    loss_fn_output_type: str = ""
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class SampledSequence(_Response):
    """Tokens, their logprobs, and why sampling stopped (``stop`` or ``length``)."""

    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = None


class SampleResponse(_Response):
    """Result of ``/asample`` (decoded from protobuf by the SDK): sequences and, when asked
    for, the prompt's logprobs (``None`` at position 0)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


class ParsedCheckpointTinkerPath(_Response):
    """A parsed checkpoint path, as the Tinker SDK names its parts (see :class:`TinkerPath`).

    ``checkpoint_id`` is ``<kind>/<name>`` (e.g. ``weights/final``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Parse ``tinker://<run>/<kind>/<name>`` with :meth:`TinkerPath.parse`.

        Raises:
            InvalidTinkerPathError: (a ``ValueError``) The path does not have that form.
        """
        path = TinkerPath.parse(tinker_path)
        return cls(
            tinker_path=str(path),
            training_run_id=path.run_id,
            checkpoint_type=path.checkpoint_type,
            checkpoint_id=path.checkpoint_id,
        )
