"""One definition per wire type: the SDK's request bodies and its lenient parsing.

Each SDK call is run against a recording transport (no server); every JSON body it sends
must be exactly what the protocol's strict request model accepts and re-serialises to
(an independent check of ``wire_body``), and must equal the body the SDK sent before the
models were shared (the literal dicts below, copied from the SDK as it was).
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

import tensafe.client as ts
import tensafe.protocol as p
from tensafe.client import types
from tensafe.client._http import Transport
from tensafe.protocol import external_weights as pe
from tensafe.protocol import tensafe as pt

KEY = "tml-" + "k" * 43
RUN = "s-1:train:0"

# Which strict model validates the JSON body of each path.
_MODEL_OF_PATH: dict[str, type[pydantic.BaseModel]] = {
    "api/v1/create_session": p.CreateSessionRequest,
    "api/v1/session_heartbeat": p.SessionHeartbeatRequest,
    "api/v1/create_model": p.CreateModelRequest,
    "api/v1/get_info": p.GetInfoRequest,
    "api/v1/optim_step": p.OptimStepRequest,
    "api/v1/save_weights": p.SaveWeightsRequest,
    "api/v1/save_weights_for_sampler": p.SaveWeightsForSamplerRequest,
    "api/v1/save_weights_external": pt.SaveWeightsExternalRequest,
    "api/v1/load_weights": p.LoadWeightsRequest,
    "api/v1/create_sampling_session": p.CreateSamplingSessionRequest,
    "api/v1/asample": p.SampleRequest,
    "api/v1/retrieve_future": p.RetrieveFutureRequest,
    "api/v1/tensafe/train_step": p.TrainStepRequest,
    "api/v1/weights_info": p.WeightsInfoRequest,
}


class Recorder:
    """Answers every SDK request with a canned JSON body; remembers what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def __call__(self, transport: Transport, method: str, path: str, **kwargs: Any) -> httpx.Response:
        body = kwargs.get("json")
        self.sent.append((method, path, body))
        answer: dict[str, Any] = {"request_id": "req-1", "model_id": RUN, "sample_sequence_ids": ["x"]}
        if path == "api/v1/create_session":
            answer = {"session_id": "s-1", "future_field": 1}
        elif path == "api/v1/get_info":
            answer = {"model_id": RUN, "model_data": {"model_name": "m", "new": True}, "later": []}
        elif path == "api/v1/create_sampling_session":
            answer = {"sampling_session_id": "s-1:sample:0"}
        elif path == "api/v1/retrieve_future":
            answer = {"model_id": RUN, "path": "tinker://s-1:train:0/weights/a", "added_later": {"x": 1}}
        elif path == "api/v1/weights_info":
            answer = {"base_model": "m", "is_lora": True, "lora_rank": 4, "added_later": 1}
        elif path.startswith("api/v1/samplers/"):
            answer = {"sampler_id": "s-1:sample:0", "base_model": "m"}
        request = httpx.Request(method, "http://127.0.0.1/" + path)
        return httpx.Response(200, json=answer, request=request)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    monkeypatch.setattr(Transport, "request", lambda self, method, path, **kw: rec(self, method, path, **kw))
    yield rec


def _check_against_schema(sent: list[tuple[str, str, Any]]) -> None:
    for _method, path, body in sent:
        if body is None:
            continue
        model = _MODEL_OF_PATH.get(path)
        if model is None and path.endswith("/finish"):
            model = p.FinishSessionRequest
        if model is None and path.endswith("/ttl"):
            model = pt.SetTtlRequest
        assert model is not None, f"no protocol model for {path}"
        parsed = model.model_validate(body)  # strict, as the server validates it
        assert parsed.model_dump(mode="json", exclude_unset=True) == body, path


def test_every_sdk_body_is_an_instance_of_the_protocol_model(recorder: Recorder) -> None:
    service = ts.ServiceClient(base_url="http://127.0.0.1:9", api_key=KEY, user_metadata={"a": "b"})
    training = service.create_lora_training_client("m", rank=4, seed=7).result(10)
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result(10)
    training.save_state("s1", ttl_seconds=7200).result(10)
    training.save_weights_for_sampler("w1").result(10)
    training.save_weights_external("e1", age_encryption_recipients=["age1x"]).result(10)
    training.load_state("tinker://s-1:train:0/weights/s1").result(10)
    training.train_step("cross_entropy", types.AdamParams()).result(10)
    service.create_training_client_from_state_with_optimizer("tinker://s-1:train:0/weights/s1").result(10)
    sampler = service.create_sampling_client(model_path="tinker://s-1:train:0/sampler_weights/w1").result(10)
    sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=3))
    rest = service.create_rest_client()
    rest.get_weights_info_by_tinker_path("tinker://s-1:train:0/weights/s1").result(10)
    rest.set_checkpoint_ttl_from_tinker_path("tinker://s-1:train:0/weights/s1", None).result(10)
    rest.close()
    service.close().result(10)
    _check_against_schema(recorder.sent)
    bodies = {path: body for _m, path, body in recorder.sent if body is not None}
    # The bodies the SDK sent before it built protocol models (literal copies).
    assert bodies["api/v1/create_session"] == {
        "tags": [],
        "user_metadata": {"a": "b"},
        "sdk_version": bodies["api/v1/create_session"]["sdk_version"],
        "type": "create_session",
    }
    assert bodies["api/v1/create_model"] == {
        "session_id": "s-1",
        "model_seq_id": 0,
        "base_model": "m",
        "lora_config": {"rank": 4, "seed": 7, "train_unembed": True, "train_mlp": True, "train_attn": True},
        "optimizer_config": {"type": "adamw"},
        "type": "create_model",
    }
    assert bodies["api/v1/tensafe/train_step"] == {
        "model_id": RUN,
        "seq_id": 6,
        "loss_fn": "cross_entropy",
        "loss_fn_config": None,
        "adam_params": types.AdamParams().model_dump(mode="json"),
        "type": "train_step",
    }
    assert bodies["api/v1/load_weights"] == {
        "session_id": "s-1",
        "model_seq_id": 1,
        "path": "tinker://s-1:train:0/weights/s1",
        "optimizer": True,
        "type": "load_weights",
    }
    assert bodies["api/v1/asample"] == {
        "num_samples": 1,
        "prompt": {"chunks": [{"tokens": [1, 2], "type": "encoded_text"}]},
        "sampling_params": {"max_tokens": 3, "temperature": 1.0, "top_k": -1, "top_p": 1.0},
        "sampling_session_id": "s-1:sample:0",
        "seq_id": 0,
        "prompt_logprobs": False,
        "topk_prompt_logprobs": 0,
        "topk_sample_logprobs": 0,
        "prompt_alt_tokens_k": 0,
        "record_stability_info": False,
        "type": "sample",
    }
    assert bodies["api/v1/save_weights_external"] == {
        "model_id": RUN,
        "path": "e1",
        "seq_id": 4,
        "age_encryption_recipients": ["age1x"],
        "type": "save_weights_external",
    }
    finish = [body for _m, path, body in recorder.sent if path.endswith("/finish")]
    assert finish == [{"reason": {"type": "success"}, "detail": None}]
    ttl = [body for _m, path, body in recorder.sent if path.endswith("/ttl")]
    assert ttl == [{"ttl_seconds": None}]


def test_the_sdk_ignores_fields_a_newer_server_adds(recorder: Recorder) -> None:
    # The canned answers carry unknown fields at the top level and nested (model_data.new).
    service = ts.ServiceClient(base_url="http://127.0.0.1:9", api_key=KEY)
    training = service.create_lora_training_client("m", rank=4).result(10)
    assert training.get_info().model_data.model_name == "m"
    assert training.save_state("s1").result(10).path == "tinker://s-1:train:0/weights/a"
    service.close().result(10)


def test_the_same_classes_are_strict_without_the_lenient_context() -> None:
    body = {"model_id": RUN, "model_data": {"model_name": "m", "new": True}}
    # Responses: tolerant at the top level everywhere; nested request-like models too under LENIENT.
    assert p.parse_lenient(p.GetInfoResponse, body).model_data.model_name == "m"
    request = {"model_id": RUN, "seq_id": 1, "adam_params": {"learning_rate": 0.1, "momentum": 0.9}}
    with pytest.raises(pydantic.ValidationError, match="momentum"):
        p.OptimStepRequest.model_validate(request)  # the server's view: refused
    lenient = p.parse_lenient(p.OptimStepRequest, request)  # the SDK's view: dropped
    assert lenient.adam_params is not None and lenient.adam_params.learning_rate == 0.1
    assert p.parse_lenient_json(p.OptimStepRequest, json.dumps(request)) == lenient
    # Nothing but unknown fields is relaxed: a wrong type is still refused in the lenient mode.
    with pytest.raises(pydantic.ValidationError):
        p.parse_lenient(p.OptimStepRequest, {**request, "seq_id": "one"})


def test_sdk_types_are_the_protocols() -> None:
    for name in types.__all__:
        sdk = getattr(types, name)
        if hasattr(p, name):
            assert sdk is getattr(p, name), name
    assert types.GetSamplerResponse is p.SamplerInfo
    assert types.ModelInput is p.ModelInputBody


def _protocol_classes() -> dict[str, type[pydantic.BaseModel]]:
    found: dict[str, type[pydantic.BaseModel]] = {}
    for module in (p, pt, pe):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, pydantic.BaseModel):
                found[value.__qualname__] = value
    return found


def test_every_pydantic_model_of_the_sdk_is_a_protocol_class() -> None:
    protocol = _protocol_classes()
    # Every model tensafe.client.types offers is a protocol class, by identity (no second copy).
    models = {
        name: value
        for name, value in vars(types).items()
        if isinstance(value, type) and issubclass(value, pydantic.BaseModel)
    }
    assert {"AuditHead", "AuditRecord", "PrivacyReport", "ExternalWeightsUrlsResponse"} <= set(models)
    for name, model in models.items():
        assert protocol.get(model.__qualname__) is model, (
            f"tensafe.client.types.{name} is a second definition"
        )
    assert types.AuditRecord is pt.AuditRecordView and types.AuditRecordsResponse is pt.AuditRecordsResponse
    # ... and so is every model any module of the SDK holds.
    for info in pkgutil.walk_packages(ts.__path__, "tensafe.client."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, pydantic.BaseModel)
                and value is not pydantic.BaseModel
            ):
                assert protocol.get(value.__qualname__) is value, f"{info.name}.{name}"


def test_no_class_of_the_sdk_source_repeats_a_protocol_class_name() -> None:
    # The grep of the source: a class statement in tensafe/client named like a protocol
    # class, or deriving from a pydantic base, is a second definition.
    protocol = set(_protocol_classes()) | {"AuditRecord"}
    root = Path(ts.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
            if node.name in protocol or bases & {"BaseModel", "WireModel", "WireRequest", "WireResponse"}:
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert offenders == []


def test_the_audit_models_take_what_the_server_sends() -> None:
    from tensafe.audit import AuditRecord as StoredRecord

    # What the server sends is the stored record's export form (routers/tensafe.py): every
    # field, including an empty resource; the tenant is hashed but not part of the view.
    stored = StoredRecord(
        tenant="acme",
        seq=3,
        timestamp="2026-01-31T12:00:00.000000Z",
        actor="key-1",
        action="api.create_session",
        resource="",
        details={"n": 1},
        prev_hash="a" * 64,
        record_hash="b" * 64,
    )
    record = p.parse_lenient(types.AuditRecord, {**stored.to_json(), "added_later": 1})
    assert record.model_dump() == {k: v for k, v in stored.to_json().items() if k != "tenant"}
    missing = {k: v for k, v in stored.to_json().items() if k != "format"}
    with pytest.raises(pydantic.ValidationError, match="format"):
        p.parse_lenient(types.AuditRecord, missing)  # the server always sends it
    head = {
        "format": "tensafe-audit-checkpoint/1",
        "tenant": "acme",
        "length": 4,
        "head_hash": "b" * 64,
        "timestamp": stored.timestamp,
        "key_id": "k",
        "signature": "c2ln",
    }
    kept = p.parse_lenient(types.AuditHead, head)
    assert json.loads(kept.to_json()) == head and kept.to_json().endswith("\n")
    with pytest.raises(pydantic.ValidationError):
        p.parse_lenient(types.AuditHead, {**head, "length": -1})


def test_a_media_chunk_is_refused_before_it_is_trained_on() -> None:
    from tensafe.client._wire import encode_forward_backward_request

    datum = types.Datum(
        model_input=types.ModelInput(chunks=[p.MediaChunk(type="image", data="x")]),
        loss_fn_inputs={"target_tokens": [1]},
    )
    with pytest.raises(ValueError, match="image chunks"):
        encode_forward_backward_request(model_id=RUN, seq_id=1, data=[datum], loss_fn="cross_entropy")


def test_wire_body_refuses_fields_the_protocol_does_not_define() -> None:
    from tensafe.client._requests import wire_body

    with pytest.raises(TypeError, match="no field"):
        wire_body(p.GetInfoRequest, model_id=RUN, typo=1)
