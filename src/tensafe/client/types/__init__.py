"""Wire types of the TenSafe SDK, one module per type (names as in the Tinker SDK).

Nothing is defined here: every name is the one definition in :mod:`tensafe.protocol`,
re-exported so that ``from tensafe.client import types`` keeps working. The SDK parses
answers leniently (unknown fields ignored, :func:`tensafe.protocol.parse_lenient`); what
it sends is validated strictly by the server. The TenSafe routes' models (audit,
artifacts, privacy, external-weights URLs) are those of :mod:`tensafe.protocol.tensafe`;
``AuditRecord`` is the SDK's name of its ``AuditRecordView``.
"""

from __future__ import annotations

from tensafe.client.types.adam_params import AdamParams
from tensafe.client.types.artifact_info import ArtifactInfo, ArtifactsResponse
from tensafe.client.types.audit_head import AuditHead
from tensafe.client.types.audit_record import AuditRecord, AuditRecordsResponse
from tensafe.client.types.audit_verification import AuditVerification
from tensafe.client.types.datum import Datum
from tensafe.client.types.encoded_text_chunk import EncodedTextChunk
from tensafe.client.types.external_weights_urls_response import ExternalWeightsUrlsResponse
from tensafe.client.types.forward_backward_output import ForwardBackwardOutput
from tensafe.client.types.get_sampler_response import GetSamplerResponse
from tensafe.client.types.load_weights_response import LoadWeightsResponse
from tensafe.client.types.model_input import ModelInput
from tensafe.client.types.optim_step_response import OptimStepResponse
from tensafe.client.types.parsed_checkpoint_tinker_path import CheckpointType, ParsedCheckpointTinkerPath
from tensafe.client.types.privacy_report import PrivacyReport
from tensafe.client.types.provenance_spans import PromptProvenanceSpan, ProvenanceSpans, SampledProvenanceSpan
from tensafe.client.types.sample_response import SampleResponse
from tensafe.client.types.sampled_sequence import SampledSequence
from tensafe.client.types.sampling_params import SamplingParams
from tensafe.client.types.save_weights_external_response import SaveWeightsExternalResponse
from tensafe.client.types.save_weights_for_sampler_response import SaveWeightsForSamplerResponse
from tensafe.client.types.save_weights_response import SaveWeightsResponse
from tensafe.client.types.server_sampling import RegisterDatasetResponse, TrainStepResponse
from tensafe.client.types.tensor_data import TensorData
from tensafe.protocol import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    GetInfoResponse,
    GetSessionResponse,
    ListSessionsResponse,
    LoraConfig,
    ModelData,
    OptimizerConfig,
    ServerCapabilities,
    SupportedModel,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
)

__all__ = [
    "AdamParams",
    "ArtifactInfo",
    "ArtifactsResponse",
    "AuditHead",
    "AuditRecord",
    "AuditRecordsResponse",
    "AuditVerification",
    "Checkpoint",
    "CheckpointType",
    "CheckpointsListResponse",
    "Cursor",
    "Datum",
    "EncodedTextChunk",
    "ExternalWeightsUrlsResponse",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "GetSamplerResponse",
    "GetSessionResponse",
    "ListSessionsResponse",
    "LoadWeightsResponse",
    "LoraConfig",
    "ModelData",
    "ModelInput",
    "OptimStepResponse",
    "OptimizerConfig",
    "ParsedCheckpointTinkerPath",
    "PrivacyReport",
    "PromptProvenanceSpan",
    "ProvenanceSpans",
    "RegisterDatasetResponse",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingParams",
    "SaveWeightsExternalResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServerCapabilities",
    "SupportedModel",
    "TensorData",
    "TrainStepResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
]
