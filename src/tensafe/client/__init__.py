"""TenSafe's Python SDK: the Tinker SDK's interface, plus privacy, audit and artifacts.

::

    from tensafe.client import ServiceClient, types

    service = ServiceClient(base_url="http://127.0.0.1:8000", api_key="tml-...")
    training = service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8).result()
    fwd = training.forward_backward(batch, "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-4))
    print(fwd.result().metrics, opt.result().metrics, training.get_privacy().epsilon_spent)

The SDK is light: it imports httpx, pydantic, protobuf and NumPy, never torch, the
server or ``tensafe.crypto.hazmat``. ``get_tokenizer()`` imports ``transformers`` only when
called. See ``docs/sdk.md``.
"""

from __future__ import annotations

from tensafe.client import types
from tensafe.client._custom_loss import CustomLossFn
from tensafe.client._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientConfigurationError,
    ConflictError,
    CrossOriginRedirectError,
    GoneError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    RequestTooLargeError,
    TensafeClientError,
    UnprocessableEntityError,
)
from tensafe.client._futures import APIFuture, FutureStatus
from tensafe.client._http import DEFAULT_BASE_URL
from tensafe.client._rest import RestClient
from tensafe.client._sampling import SamplingClient
from tensafe.client._service import ServiceClient
from tensafe.client._training import TrainingClient

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientConfigurationError",
    "ConflictError",
    "CrossOriginRedirectError",
    "CustomLossFn",
    "FutureStatus",
    "GoneError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "RequestTooLargeError",
    "RestClient",
    "SamplingClient",
    "ServiceClient",
    "TensafeClientError",
    "TrainingClient",
    "UnprocessableEntityError",
    "types",
]
