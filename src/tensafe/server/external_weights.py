"""Bring your own adapter: upload a PEFT LoRA trained elsewhere, and search checkpoints.

Tinker 0.39's ``external_weights_upload_start`` / ``external_weights_upload_finish`` and
``search_checkpoints`` (wire models: :mod:`tensafe.protocol.external_weights`; routes:
:mod:`tensafe.server.routers.external_weights`).

**Upload.** :func:`start_upload` issues an ``upload_id`` (``xw-`` + 128 random bits) and one
``PUT`` URL per file of a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``):
``/api/v1/external_weights_uploads/<upload_id>/<file>?expires=<unix>&signature=<hex>``. The
signature is the tenant's keyed digest (:meth:`EncryptedArtifactStore.tenant_digest`, HMAC-SHA256
under a key derived from the tenant's DEK, label :data:`URL_LABEL`) of the tenant, the upload id,
the file name and the expiry, so a URL is good only for that tenant (the ``PUT`` also needs the
tenant's API key), that upload, that file and until ``expires`` (:data:`UPLOAD_SECONDS`). Each URL
is single-use: :func:`receive_file` claims its grant row with one conditional ``UPDATE``, so of two
``PUT`` s of one URL (in any processes) exactly one is kept. Files are stored encrypted under the
tenant's DEK as they arrive; the pending upload (its base model and LoRA settings) is an
encrypted artifact ``<upload_id>.meta``. The grants live in ``download_tokens`` (no migration):
rows whose ``id`` starts with ``ul-`` and whose ``checkpoint_id`` is the upload id; their
``token_hash`` uses another label than download tokens and names no checkpoint, so the download
route can never serve one.

**Verification** (:func:`verify_adapter`, at finish; every failure is a 400 that names the
problem, audited as ``api.external_weights_upload_refused``, and the upload is discarded): the
safetensors file parses with the ``safetensors`` library (never pickle); the PEFT config is a
LoRA config whose ``r`` equals ``lora_config.rank``, without DoRA, biases, extra modules or rank
and alpha patterns; ``base_model_name_or_path`` names the declared base model (or its
tokenizer id) or is absent (then the declared ``base_model`` governs, and the shapes below are
checked against it); the base model is one this server serves; every tensor is
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` of a linear module of that base
model allowed by ``train_attn`` / ``train_mlp`` / ``train_unembed``, both present, of shape
exactly ``(r, in_features)`` / ``(out_features, r)``, a float dtype and finite. Module shapes
come from the base model's ``config.json``, instantiated on PyTorch's ``meta`` device (no
weights are read or kept).

**Storage** (:func:`finish_upload`): the verified adapter is re-written by the server (a
canonical ``adapter_config.json`` naming exactly the adapted modules, float32 tensors) with a
signed, non-private DP certificate (``private=false``, ``dp_enabled=false``, a note naming the
upload), encrypted under the tenant's DEK in the layout of an exported checkpoint
(``<ref>.<i>`` and ``<ref>.manifest``), as the checkpoint
``tinker://<session>:train:0/external_weights/adapter`` of a new run (a model row in state
``uploaded``: no optimizer state, no DP policy, never publishable) of a new finished session
``upload-<hex>``. Rows and audit record commit in one transaction.

**Use.** ``create_sampling_session`` and ``load_weights`` (weights only) accept an uploaded
checkpoint; :func:`training_session_from_upload` builds the training session (its alpha is
TenSafe's, so the ``B`` matrices are rescaled to compute exactly the uploaded update).

**Search** (:func:`search_checkpoints`): the caller's live checkpoints filtered by exact
``user_metadata`` pairs, type and base model, newest first, paginated by the cursor
``(created_at, id)`` so that pages stay stable under inserts.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from tensafe import protocol as p
from tensafe.db import utcnow
from tensafe.protocol import KIND_OF_CHECKPOINT_TYPE, TinkerPath
from tensafe.protocol import external_weights as xw
from tensafe.server.checkpoints import (
    EXTERNAL_KIND,
    MANIFEST_FORMAT,
    checkpoint_is_live,
    checkpoint_view,
    record_checkpoint,
    str_metadata,
)
from tensafe.server.errors import BadRequestError, NotFoundError
from tensafe.server.jobs import JobFailedError, Services
from tensafe.server.limits import MAX_BODY_BYTES
from tensafe.server.models import DownloadToken, ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.states import ModelState
from tensafe.server.tenants import Principal
from tensafe.storage import ArtifactNotFoundError

__all__ = [
    "ACTIONS",
    "CHECKPOINT_NAME",
    "MAX_CONFIG_BYTES",
    "MAX_WEIGHTS_BYTES",
    "UPLOADED_STATE",
    "UPLOAD_SECONDS",
    "URL_LABEL",
    "VerifiedAdapter",
    "check_loadable",
    "check_sampleable",
    "discard_upload",
    "finish_upload",
    "linear_module_shapes",
    "receive_file",
    "search_checkpoints",
    "start_upload",
    "training_session_from_upload",
    "upload_is_over",
    "verify_adapter",
]

_log = logging.getLogger("tensafe.server.external_weights")

#: How long an upload (its URLs and its finish) stays valid, in seconds.
UPLOAD_SECONDS = 3600
#: Largest ``adapter_config.json`` accepted.
MAX_CONFIG_BYTES = 64 * 1024
#: Largest ``adapter_model.safetensors`` accepted: the server's request body limit.
MAX_WEIGHTS_BYTES = MAX_BODY_BYTES
#: Label of the keyed digest that signs an upload URL.
URL_LABEL = b"tensafe/external-weights-upload-url/v1"
#: State of the model row of an uploaded adapter.
UPLOADED_STATE = ModelState.UPLOADED
#: Name of the checkpoint an upload becomes (each upload has its own run).
CHECKPOINT_NAME = "adapter"
#: Audit actions of this module (registered in ``tensafe.server.events``).
ACTIONS = (
    "api.external_weights_upload_start",
    "api.external_weights_upload_file",
    "api.external_weights_upload_finish",
    "api.external_weights_upload_refused",
)

_META_FORMAT = "tensafe.external_weights_upload/v1"
_GRANT_LABEL = b"tensafe-upload-grant-v1\x00"
_CONFIG, _WEIGHTS = xw.ADAPTER_FILES
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_UPLOAD_ID = re.compile(r"xw-[0-9a-f]{32}")
_TENSOR = re.compile(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight")
#: Module name suffixes each ``train_*`` flag allows (those of ``LoraTrainingSession.create``).
_ALLOWED = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}
#: PEFT config keys whose non-default value changes what the tensors mean (refused).
_MUST_BE_OFF = (
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "trainable_token_indices",
    "target_parameters",
    "megatron_config",
)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# --------------------------------------------------------------------------- signed URLs


def _lp(value: str) -> bytes:
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def _signature(services: Services, tenant: str, upload_id: str, file_name: str, expires: int) -> str:
    return services.store.tenant_digest(
        tenant, label=URL_LABEL, data=[_lp(tenant), _lp(upload_id), _lp(file_name), _lp(str(expires))]
    )


def _grant_hash(signature: str) -> str:
    return hashlib.sha256(_GRANT_LABEL + signature.encode("ascii")).hexdigest()


def _audit(
    services: Services, session: Session, who: Principal, action: str, resource: str, **details: Any
) -> None:
    services.audit(
        session, tenant=who.tenant, actor=who.actor, action=action, resource=resource, details=details
    )


def _refuse(
    services: Services, who: Principal, upload_id: str, reason: str, *, stage: str
) -> BadRequestError:
    """Audit a refusal (in its own transaction) and return the 400 to raise."""
    valid = bool(_UPLOAD_ID.fullmatch(upload_id))
    with services.sessions.begin() as session:
        _audit(
            services,
            session,
            who,
            "api.external_weights_upload_refused",
            upload_id if valid else "invalid-upload-id",
            stage=stage,
            reason=reason[:500],
        )
    return BadRequestError(
        f"external weights upload {upload_id if valid else repr(upload_id[:40])}: {reason}"
    )


# --------------------------------------------------------------------------- start


def upload_is_over(services: Services, tenant: str, upload_id: str, now: _dt.datetime) -> bool:
    """Whether the pending upload's URLs have expired (an unreadable record counts as over)."""
    try:
        meta = json.loads(services.store.get_bytes(tenant, upload_id + ".meta"))
        return int(meta["expires"]) <= int(now.timestamp())
    except Exception:  # an unreadable record is abandoned too
        return True


def discard_upload(
    services: Services, tenant: str, upload_id: str, *, names: list[str] | None = None
) -> None:
    """Delete a pending upload: its grants, then its encrypted files and record."""
    with services.sessions.begin() as session:
        session.execute(
            delete(DownloadToken).where(
                DownloadToken.tenant_id == tenant,
                DownloadToken.checkpoint_id == upload_id,
                DownloadToken.id.startswith("ul-"),
            )
        )
    store = services.store
    for name in names if names is not None else list(store.list(tenant)):
        if name == upload_id + ".meta" or name.startswith(upload_id + "."):
            store.delete(tenant, name)


def start_upload(
    services: Services, who: Principal, body: xw.ExternalWeightsUploadStartRequest, *, base_url: str
) -> xw.ExternalWeightsUploadStartResponse:
    """Open an upload: a pending record and one signed, single-use ``PUT`` URL per file.

    Raises:
        BadRequestError: ``destination_project_id`` is set, the base model is not served, or
            no ``train_*`` flag is set.
    """
    if body.destination_project_id is not None:
        raise BadRequestError(
            "destination_project_id must be null: this server has no projects "
            "(checkpoints belong to the tenant)"
        )
    services.catalog.get(body.base_model)  # a 400 naming the served models otherwise
    lora = body.lora_config
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise BadRequestError(
            "lora_config: at least one of train_mlp, train_attn and train_unembed must be true"
        )
    now = utcnow()
    services.store.ensure_key(who.tenant)
    upload_id = "xw-" + secrets.token_hex(16)
    expires_at = now.replace(microsecond=0) + _dt.timedelta(seconds=UPLOAD_SECONDS)
    expires = int(expires_at.timestamp())
    meta = {
        "format": _META_FORMAT,
        "upload_id": upload_id,
        "base_model": body.base_model,
        "lora_config": lora.model_dump(mode="json"),
        "expires": expires,
    }
    services.store.put_bytes(
        who.tenant, f"{upload_id}.meta", json.dumps(meta, sort_keys=True).encode(), kind="upload-meta"
    )
    base = base_url.rstrip("/")
    urls: dict[str, str] = {}
    with services.sessions.begin() as session:
        for file_name in xw.ADAPTER_FILES:
            signature = _signature(services, who.tenant, upload_id, file_name, expires)
            session.add(
                DownloadToken(
                    id="ul-" + secrets.token_hex(12),
                    token_hash=_grant_hash(signature),
                    tenant_id=who.tenant,
                    checkpoint_id=upload_id,
                    artifact_id="",
                    file_name=file_name,
                    size_bytes=0,
                    created_by=who.actor,
                    created_at=now,
                    expires_at=expires_at,
                )
            )
            urls[file_name] = (
                f"{base}/api/v1/external_weights_uploads/{upload_id}/{file_name}"
                f"?expires={expires}&signature={signature}"
            )
        session.flush()
        _audit(
            services,
            session,
            who,
            "api.external_weights_upload_start",
            upload_id,
            base_model=body.base_model,
            rank=lora.rank,
            expires=expires_at.isoformat(),
        )
    return xw.ExternalWeightsUploadStartResponse(upload_id=upload_id, urls=urls, expires=expires_at)


# --------------------------------------------------------------------------- PUT


def receive_file(
    services: Services,
    who: Principal,
    *,
    upload_id: str,
    file_name: str,
    expires: int,
    signature: str,
    data: bytes,
) -> dict[str, Any]:
    """Store one uploaded file, encrypted, if its URL is valid, unexpired and unused.

    Raises:
        BadRequestError: Unknown file, bad or foreign signature, expired or used URL, file too large.
    """
    if not _UPLOAD_ID.fullmatch(upload_id) or file_name not in xw.ADAPTER_FILES:
        raise _refuse(services, who, upload_id, f"unknown upload file {file_name[:80]!r}", stage="put")
    expected = _signature(services, who.tenant, upload_id, file_name, expires)
    if not _SIGNATURE.fullmatch(signature) or not secrets.compare_digest(expected, signature):
        raise _refuse(
            services,
            who,
            upload_id,
            "the upload URL's signature is invalid (a URL is valid only for the tenant that started "
            "the upload, "
            "for that file and until its expiry); start a new upload",
            stage="put",
        )
    now = utcnow()
    if expires <= int(now.timestamp()):
        raise _refuse(services, who, upload_id, "the upload URL has expired; start a new upload", stage="put")
    limit = MAX_CONFIG_BYTES if file_name == _CONFIG else MAX_WEIGHTS_BYTES
    if len(data) > limit:
        raise _refuse(
            services,
            who,
            upload_id,
            f"{file_name} is larger than {limit} bytes, the limit for it",
            stage="put",
        )
    index = xw.ADAPTER_FILES.index(file_name)
    artifact = f"{upload_id}.{index}.{secrets.token_hex(4)}"
    services.store.put_bytes(who.tenant, artifact, data, kind="upload")
    with services.sessions.begin() as session:
        claimed = cast(
            "CursorResult[Any]",
            session.execute(
                update(DownloadToken)
                .where(
                    DownloadToken.token_hash == _grant_hash(signature),
                    DownloadToken.tenant_id == who.tenant,
                    DownloadToken.checkpoint_id == upload_id,
                    DownloadToken.file_name == file_name,
                    DownloadToken.artifact_id == "",
                    DownloadToken.expires_at > now,
                )
                .values(artifact_id=artifact, size_bytes=len(data))
            ),
        ).rowcount
        if claimed == 1:
            _audit(
                services,
                session,
                who,
                "api.external_weights_upload_file",
                upload_id,
                file=file_name,
                size_bytes=len(data),
            )
    if claimed != 1:
        services.store.delete(who.tenant, artifact)
        raise _refuse(
            services,
            who,
            upload_id,
            f"the upload URL of {file_name} was already used (each URL is single-use) or the upload is over; "
            "start a new upload",
            stage="put",
        )
    return {"status": "stored", "file": file_name, "size_bytes": len(data)}


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VerifiedAdapter:
    """An adapter that passed :func:`verify_adapter`, in the server's canonical form.

    Attributes:
        files: ``adapter_config.json`` (written by the server) and ``adapter_model.safetensors``
            (float32, sorted names).
        modules: The adapted modules of the base model.
        alpha: ``lora_alpha``; ``rslora``: ``use_rslora`` (the update is scaled by
            ``alpha / sqrt(r)`` instead of ``alpha / r``).
        base_model_named: Whether the config named the base model (else it was absent).
    """

    files: Mapping[str, bytes]
    modules: tuple[str, ...]
    rank: int
    alpha: float
    rslora: bool
    base_model_named: bool

    @property
    def scaling(self) -> float:
        """The factor PEFT applies to ``B @ A``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@functools.lru_cache(maxsize=16)
def _shapes_cached(directory: str, stamp: int) -> Mapping[str, tuple[int, int]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return {
        name: (int(module.in_features), int(module.out_features))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def linear_module_shapes(directory: Path) -> Mapping[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every linear layer of a base model.

    Built from ``config.json`` on the ``meta`` device: no weight is read or held. Cached per
    directory (and ``config.json`` modification time).

    Raises:
        BadRequestError: The directory has no readable ``config.json``.
    """
    config = Path(directory) / "config.json"
    try:
        stamp = config.stat().st_mtime_ns
    except OSError:
        raise BadRequestError("the base model has no config.json on this server") from None
    return _shapes_cached(str(directory), stamp)


def _config_value_off(value: Any) -> bool:
    return value in (None, False, "none", 0) or (isinstance(value, list | dict) and not value)


def verify_adapter(
    config_bytes: bytes,
    weights_bytes: bytes,
    *,
    base_model: str,
    base_model_aliases: tuple[str, ...] = (),
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    train_attn: bool,
    train_mlp: bool,
    train_unembed: bool,
) -> VerifiedAdapter:
    """Check a PEFT LoRA adapter against the declared settings and the base model's shapes.

    Args:
        config_bytes: ``adapter_config.json`` as uploaded.
        weights_bytes: ``adapter_model.safetensors`` as uploaded.
        base_model: The base model the upload was started for (its catalog name).
        base_model_aliases: Other names ``base_model_name_or_path`` may use for it.
        shapes: :func:`linear_module_shapes` of the base model.
        rank: ``lora_config.rank``; the config's ``r`` and every tensor must use it.
        train_attn: Allow the attention projections.
        train_mlp: Allow the MLP projections.
        train_unembed: Allow ``lm_head``.

    Returns:
        The adapter in canonical form.

    Raises:
        BadRequestError: The first problem found, named.
    """
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequestError(f"{_CONFIG} is not UTF-8 JSON") from None
    if not isinstance(config, dict):
        raise BadRequestError(f"{_CONFIG} must be a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise BadRequestError(
            f"{_CONFIG}: peft_type is {str(peft_type)[:40]!r}; only LORA adapters are accepted"
        )
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r != rank:
        raise BadRequestError(f"{_CONFIG}: r is {str(r)[:20]}, but lora_config.rank is {rank}")
    alpha = config.get("lora_alpha", 8)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise BadRequestError(f"{_CONFIG}: lora_alpha must be a positive number")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise BadRequestError(f"{_CONFIG}: use_rslora must be true or false")
    if config.get("bias", "none") != "none":
        raise BadRequestError(f"{_CONFIG}: bias must be 'none' (bias tensors are not accepted)")
    for key in _MUST_BE_OFF:
        if not _config_value_off(config.get(key)):
            raise BadRequestError(f"{_CONFIG}: {key} is not supported; export the adapter without it")
    named = config.get("base_model_name_or_path")
    if named not in (None, ""):
        if named not in (base_model, *base_model_aliases):
            raise BadRequestError(
                f"{_CONFIG}: base_model_name_or_path is {str(named)[:200]!r}, but the upload was started for "
                f"base_model {base_model!r}"
            )

    tensors = _parse_safetensors(weights_bytes)
    allowed = tuple(
        suffix
        for flag, on in (
            ("train_attn", train_attn),
            ("train_mlp", train_mlp),
            ("train_unembed", train_unembed),
        )
        if on
        for suffix in _ALLOWED[flag]
    )
    halves: dict[str, set[str]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR.fullmatch(name)
        if match is None:
            raise BadRequestError(
                f"{_WEIGHTS}: unexpected tensor {name[:200]!r}; only "
                "base_model.model.<module>.lora_A.weight and "
                ".lora_B.weight are accepted"
            )
        module, ab = match["module"], match["ab"]
        if module not in shapes:
            raise BadRequestError(f"{_WEIGHTS}: {name[:200]!r} names no linear module of {base_model}")
        if module.rsplit(".", 1)[-1] not in allowed:
            raise BadRequestError(
                f"{_WEIGHTS}: {name[:200]!r} adapts a module that lora_config does not allow "
                f"(allowed: {', '.join(allowed)})"
            )
        in_features, out_features = shapes[module]
        expected = (rank, in_features) if ab == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise BadRequestError(
                f"{_WEIGHTS}: {name[:200]!r} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _FLOAT_DTYPES:
            raise BadRequestError(f"{_WEIGHTS}: {name[:200]!r} has dtype {dtype}; a float dtype is required")
        if not bool(tensor.isfinite().all()):
            raise BadRequestError(f"{_WEIGHTS}: {name[:200]!r} holds NaN or infinite values")
        halves.setdefault(module, set()).add(ab)
    if not halves:
        raise BadRequestError(f"{_WEIGHTS} holds no LoRA tensors")
    for module, found in halves.items():
        if found != {"A", "B"}:
            raise BadRequestError(f"{_WEIGHTS}: module {module!r} has lora_{found.pop()} but not its pair")

    import torch
    from safetensors.torch import save

    modules = tuple(sorted(halves))
    weights = save({name: tensors[name].to(torch.float32).contiguous() for name in sorted(tensors)})
    canonical = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(modules),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
    }
    return VerifiedAdapter(
        files={_CONFIG: json.dumps(canonical, sort_keys=True, indent=2).encode(), _WEIGHTS: weights},
        modules=modules,
        rank=rank,
        alpha=float(alpha),
        rslora=rslora,
        base_model_named=named not in (None, ""),
    )


def _parse_safetensors(data: bytes) -> dict[str, Any]:
    """Parse with the ``safetensors`` library (a pickle or any other format is refused).

    A safetensors file starts with its header's length (8 bytes, little-endian), then the
    JSON header (``{``): its first byte may be anything, 0x80 included, so only a file that
    does not have that shape is named a pickle (0x80 protocol opcode) or a zip (``torch.save``).
    """
    safetensors_shaped = len(data) > 8 and data[8:9] == b"{"
    if not safetensors_shaped and (data[:2] == b"PK" or data[:1] == b"\x80"):
        raise BadRequestError(
            f"{_WEIGHTS} is a pickle / torch.save file; only safetensors is accepted (save with "
            "safe_serialization=True)"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise BadRequestError(f"{_WEIGHTS} is not a valid safetensors file ({str(exc)[:200]})") from None
    return dict(tensors)


# --------------------------------------------------------------------------- finish


def _pending(services: Services, who: Principal, upload_id: str) -> dict[str, Any]:
    try:
        meta = json.loads(services.store.get_bytes(who.tenant, f"{upload_id}.meta"))
    except ArtifactNotFoundError:
        raise NotFoundError(f"unknown upload {upload_id!r} (finished, expired or never started)") from None
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT or meta.get("upload_id") != upload_id:
        raise NotFoundError(f"unknown upload {upload_id!r}")
    return meta


def _certificate(services: Services, upload_id: str, digest: str) -> bytes:
    from tensafe.privacy import DpCertificate, SamplingMethod

    signer = services.signer
    if signer is None:
        raise BadRequestError(
            "this server has no deployment signing key, so it cannot certify uploaded weights"
        )
    certificate = DpCertificate.non_private(
        steps=0,
        dataset_size=1,
        dataset_size_source="declared",
        expected_batch_size=None,
        sample_rate=None,
        sampling_method=SamplingMethod.CLIENT_CHOSEN_BATCHES,
        sampled_by="client",
        privacy_unit="datum",
        notes=(
            f"These LoRA weights were uploaded (upload {upload_id}, adapter_model.safetensors "
            f"sha256 {digest}): "
            "they were trained outside this server, which knows nothing of their training data; no "
            "differential privacy guarantee applies to them.",
            "dataset_size is a placeholder: the training data is unknown to the server.",
        ),
    )
    return certificate.sign(signer).to_json().encode("utf-8")


def finish_upload(
    services: Services, who: Principal, upload_id: str
) -> xw.ExternalWeightsUploadFinishResponse:
    """Verify the uploaded files and record them as an ``external_weights`` checkpoint.

    Raises:
        NotFoundError: No pending upload of this tenant has this id.
        BadRequestError: A file is missing, the upload expired, or verification failed (the
            upload is then discarded).
    """
    meta = _pending(services, who, upload_id)
    now = utcnow()
    if int(meta["expires"]) <= int(now.timestamp()):
        discard_upload(services, who.tenant, upload_id)
        raise _refuse(services, who, upload_id, "the upload has expired; start a new upload", stage="finish")
    with services.sessions() as session:
        grants = {
            g.file_name: g.artifact_id
            for g in session.execute(
                select(DownloadToken).where(
                    DownloadToken.tenant_id == who.tenant,
                    DownloadToken.checkpoint_id == upload_id,
                    DownloadToken.id.startswith("ul-"),
                )
            ).scalars()
        }
    missing = [f for f in xw.ADAPTER_FILES if not grants.get(f)]
    if missing:
        raise BadRequestError(
            f"external weights upload {upload_id}: {', '.join(missing)} not uploaded yet; "
            "PUT each file to its URL"
        )
    raw = {f: services.store.get_bytes(who.tenant, grants[f]) for f in xw.ADAPTER_FILES}
    base_model = str(meta["base_model"])
    lora = p.LoraConfig.model_validate(meta["lora_config"])
    try:
        entry = services.catalog.get(base_model)
        aliases = tuple(a for a in (entry.tokenizer_id, base_model.split(":", 1)[0]) if a)
        verified = verify_adapter(
            raw[_CONFIG],
            raw[_WEIGHTS],
            base_model=base_model,
            base_model_aliases=aliases,
            shapes=linear_module_shapes(entry.directory()),
            rank=lora.rank,
            train_attn=lora.train_attn,
            train_mlp=lora.train_mlp,
            train_unembed=lora.train_unembed,
        )
    except BadRequestError as exc:
        discard_upload(services, who.tenant, upload_id)
        raise _refuse(services, who, upload_id, str(exc), stage="finish") from None

    digest = hashlib.sha256(raw[_WEIGHTS]).hexdigest()
    files = dict(verified.files)
    from tensafe.privacy.certificate import CERTIFICATE_FILENAME

    files[CERTIFICATE_FILENAME] = _certificate(services, upload_id, digest)
    ref = "ext-" + secrets.token_hex(12)
    entries: list[dict[str, Any]] = []
    for i, (file_name, data) in enumerate(sorted(files.items())):
        services.store.put_bytes(who.tenant, f"{ref}.{i}", data, kind="external-weights")
        entries.append(
            {
                "name": file_name,
                "artifact": f"{ref}.{i}",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {"format": MANIFEST_FORMAT, "age_encrypted": False, "files": entries, "uploaded": upload_id}
    services.store.put_bytes(
        who.tenant, f"{ref}.manifest", json.dumps(manifest, sort_keys=True).encode(), kind="manifest"
    )

    session_id = "upload-" + upload_id.removeprefix("xw-")
    model_id = p.model_id_for(session_id, 0)
    path = str(TinkerPath(run_id=model_id, kind=EXTERNAL_KIND, name=CHECKPOINT_NAME))
    size = sum(e["size"] for e in entries)
    certificate = json.loads(files[CERTIFICATE_FILENAME])
    try:
        with services.sessions.begin() as session:
            if session.get(ServerSession, session_id) is not None:
                raise BadRequestError(f"external weights upload {upload_id} is already finished: {path}")
            session.add(
                ServerSession(
                    id=session_id,
                    tenant_id=who.tenant,
                    created_at=now,
                    last_heartbeat_at=now,
                    finished_at=now,
                    finish_reason="upload",
                    user_metadata="{}",
                    tags="[]",
                    display_name=f"external weights upload {upload_id}",
                )
            )
            session.flush()
            session.add(
                TrainingModel(
                    id=model_id,
                    tenant_id=who.tenant,
                    session_id=session_id,
                    model_seq_id=0,
                    base_model=base_model,
                    lora_rank=lora.rank,
                    lora_config=json.dumps(
                        {
                            **lora.model_dump(mode="json"),
                            "alpha": verified.alpha,
                            "use_rslora": verified.rslora,
                        },
                        sort_keys=True,
                    ),
                    optimizer_config="{}",
                    user_metadata="{}",
                    state=UPLOADED_STATE,
                    created_at=now,
                    last_request_time=now,
                    dp_policy=json.dumps({"policy": None, "source": "upload"}, sort_keys=True),
                    step=0,
                    privacy_spent=json.dumps(
                        {
                            "spent": {"dp_enabled": False, "epsilon": None, "steps": 0},
                            "certificate": certificate,
                        },
                        sort_keys=True,
                    ),
                )
            )
            session.flush()
            record_checkpoint(
                session,
                tenant=who.tenant,
                model_id=model_id,
                kind=EXTERNAL_KIND,
                name=CHECKPOINT_NAME,
                artifact_id=ref,
                size_bytes=size,
                user_metadata="{}",
                ttl_seconds=None,
            )
            session.execute(
                delete(DownloadToken).where(
                    DownloadToken.tenant_id == who.tenant,
                    DownloadToken.checkpoint_id == upload_id,
                    DownloadToken.id.startswith("ul-"),
                )
            )
            _audit(
                services,
                session,
                who,
                "api.external_weights_upload_finish",
                path,
                upload_id=upload_id,
                base_model=base_model,
                rank=lora.rank,
                modules=len(verified.modules),
                weights_sha256=digest,
                base_model_named=verified.base_model_named,
                artifact=ref,
                private=False,
            )
    except BaseException:
        for i in range(len(entries)):
            services.store.delete(who.tenant, f"{ref}.{i}")
        services.store.delete(who.tenant, f"{ref}.manifest")
        raise
    for name in [*grants.values(), f"{upload_id}.meta"]:
        try:
            services.store.delete(who.tenant, name)
        except Exception:  # the upload's leftovers; the checkpoint is complete
            _log.exception("could not delete a finished upload's temporary file")
    return xw.ExternalWeightsUploadFinishResponse(tinker_path=path)


# --------------------------------------------------------------------------- load_weights


def training_session_from_upload(
    *, directory: str, adapter_files: Mapping[str, bytes], lora_config: Mapping[str, Any], policy: Any
) -> Any:
    """A new :class:`~tensafe.training.runtime.LoraTrainingSession` holding an uploaded adapter.

    The session has the upload's rank and ``train_*`` modules and runs under ``policy`` (the
    new run's effective policy; None only when it is explicitly non-private); it starts at step
    0 with a fresh optimizer. TenSafe's sessions scale the update by ``LORA_ALPHA / r``, so each
    ``B`` is multiplied by ``(upload scaling) / (session scaling)``: the session computes the
    uploaded adapter's function. Modules the upload does not adapt get ``B = 0``.

    Raises:
        JobFailedError: The stored adapter does not fit the session (it was verified at upload,
            so this means the record was altered).
    """
    import torch
    from safetensors.torch import load

    from tensafe.training.runtime import LORA_ALPHA, LoraTrainingSession

    config = json.loads(adapter_files[_CONFIG])
    rank = int(config["r"])
    upload_scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    factor = upload_scaling / (LORA_ALPHA / rank)
    tensors = load(bytes(adapter_files[_WEIGHTS]))
    session = LoraTrainingSession.create(
        base_model=directory,
        rank=rank,
        dp=policy,
        train_mlp=bool(lora_config.get("train_mlp", True)),
        train_attn=bool(lora_config.get("train_attn", True)),
        train_unembed=bool(lora_config.get("train_unembed", False)),
        allow_non_private=policy is None,
    )
    params = {
        name.replace(".default.weight", ".weight"): param
        for name, param in session.model.named_parameters()
        if param.requires_grad
    }
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        session.close()
        raise JobFailedError(
            f"the uploaded adapter has tensors the training session lacks: {unknown[0]!r}", category="server"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = tensors.get(name)
            if value is None:
                if ".lora_B." in name:
                    param.zero_()
                continue
            if ".lora_B." in name:
                value = value.to(torch.float64) * factor
            param.copy_(value.to(param.dtype))
    return session


# --------------------------------------------------------------------------- search


#: Rows read per batch while filtering on ``user_metadata`` (stored as JSON text).
_SCAN_BATCH = 500


def search_checkpoints(
    services: Services, who: Principal, body: xw.CheckpointSearchRequest
) -> xw.CheckpointSearchResponse:
    """The caller's live checkpoints matching every filter, newest first, one page.

    Order and cursor are ``(created_at, id)`` descending: a page starts strictly after the
    cursor, so checkpoints created after the first page never shift or repeat later pages.
    ``user_metadata`` is compared on the decoded values (exact string equality), in Python,
    over the rows the SQL filters leave.

    Raises:
        BadRequestError: ``project_ids`` is set, or ``owner`` is not the caller's tenant.
    """
    if body.project_ids is not None:
        raise BadRequestError("project_ids must be null: this server has no projects")
    if body.owner is not None and body.owner != who.tenant:
        raise BadRequestError(
            f"owner must be your own tenant ({who.tenant!r}) or omitted: searching another "
            "tenant's checkpoints "
            "is not possible"
        )
    if body.base_models is not None and not body.base_models:
        return xw.CheckpointSearchResponse(checkpoints=[], next_cursor=None)
    query = (
        select(TrainingCheckpoint)
        .join(TrainingModel, TrainingModel.id == TrainingCheckpoint.model_id)
        .where(TrainingCheckpoint.tenant_id == who.tenant, TrainingModel.tenant_id == who.tenant)
        .where(checkpoint_is_live())
    )
    if body.checkpoint_type is not None:
        query = query.where(TrainingCheckpoint.kind == KIND_OF_CHECKPOINT_TYPE[body.checkpoint_type])
    if body.base_models is not None:
        query = query.where(TrainingModel.base_model.in_(body.base_models))
    cursor = body.cursor
    if cursor is not None:
        at = cursor.last_created_at.astimezone(_dt.UTC)
        query = query.where(
            or_(
                TrainingCheckpoint.created_at < at,
                and_(
                    TrainingCheckpoint.created_at == at, TrainingCheckpoint.id < cursor.last_checkpoint_uuid
                ),
            )
        )
    query = query.order_by(TrainingCheckpoint.created_at.desc(), TrainingCheckpoint.id.desc())
    wanted = dict(body.user_metadata)
    found: list[TrainingCheckpoint] = []
    more = False
    with services.reads() as session:
        offset = 0
        while True:
            rows = list(session.execute(query.limit(_SCAN_BATCH).offset(offset)).scalars())
            for row in rows:
                if wanted:
                    have = str_metadata(row.user_metadata) or {}
                    if any(have.get(k) != v for k, v in wanted.items()):
                        continue
                if len(found) == body.limit:
                    more = True
                    break
                found.append(row)
            if more or len(rows) < _SCAN_BATCH:
                break
            offset += _SCAN_BATCH
        views = [checkpoint_view(r) for r in found]
        last = found[-1] if found else None
        next_cursor = (
            xw.CheckpointSearchCursor(last_created_at=last.created_at, last_checkpoint_uuid=last.id)
            if more and last is not None
            else None
        )
    return xw.CheckpointSearchResponse(checkpoints=views, next_cursor=next_cursor)


# --------------------------------------------------------------------------- existing routes


def _uploaded(session: Session, ckpt: TrainingCheckpoint) -> bool:
    """Whether ``ckpt`` is the checkpoint of an uploaded adapter."""
    if ckpt.kind != EXTERNAL_KIND:
        return False
    model = session.get(TrainingModel, ckpt.model_id)
    return model is not None and model.state == UPLOADED_STATE


def check_loadable(session: Session, ckpt: TrainingCheckpoint, *, path: str, optimizer: bool) -> None:
    """``load_weights``: a ``weights`` checkpoint, or an uploaded adapter without optimizer state.

    Raises:
        BadRequestError: Any other checkpoint, or ``optimizer=True`` for an uploaded adapter.
    """
    if ckpt.kind == "weights":
        return
    if not _uploaded(session, ckpt):
        raise BadRequestError(f"{path!r} is not a training-state (weights) checkpoint")
    if optimizer:
        raise BadRequestError(
            f"{path!r} holds uploaded weights without optimizer state; load it without the optimizer "
            "(create_training_client_from_state, not ..._with_optimizer)"
        )


def check_sampleable(session: Session, ckpt: TrainingCheckpoint, *, path: str) -> None:
    """``create_sampling_session``: a ``sampler_weights`` checkpoint or an uploaded adapter.

    Raises:
        BadRequestError: Any other checkpoint.
    """
    if ckpt.kind != "sampler_weights" and not _uploaded(session, ckpt):
        raise BadRequestError(
            f"{path!r} is not a sampler_weights checkpoint; save one with save_weights_for_sampler"
        )
