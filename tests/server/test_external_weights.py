"""Bring your own adapter (external weights upload) and checkpoint search, against a live server.

Oracles: ``peft`` loading the same adapter in-process on the same base model (the sampler's
logprobs and the training run's forward pass must equal its own); the ``safetensors`` and
``cryptography``-backed certificate verification; a naive Python filter for the search
(Hypothesis over metadata sets and page sizes). Each refusal is performed as an attacker or a
careless client would: wrong rank, wrong shape, unknown module, NaN, a pickle file, an extra
tensor, another tenant's URL, an expired or reused URL, project ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import pathlib
import secrets
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select

from server.conftest import TINY_MODEL, LiveServer, ServerEnv
from tensafe import client as ts
from tensafe.client import types
from tensafe.db import utcnow
from tensafe.privacy import DpCertificate
from tensafe.protocol import LoraConfig
from tensafe.protocol import external_weights as xw
from tensafe.server import external_weights as xws
from tensafe.server.errors import BadRequestError
from tensafe.server.models import DownloadToken, ServerSession, TrainingCheckpoint, TrainingModel
from tensafe.server.retention import sweep_abandoned_uploads
from tensafe.server.tenants import Principal

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
RANK = 4
PROMPT = [1, 17, 23, 42, 99, 7, 300, 301]
CONFIG, WEIGHTS = xw.ADAPTER_FILES


def _base(tiny_model_dir: pathlib.Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A PEFT adapter trained "elsewhere": random A and B (so it changes the model), alpha 16."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(
        _base(tiny_model_dir),
        PeftLoraConfig(
            r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(3.0)  # a visible effect on the tiny model
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(directory))
    return directory


def _oracle_logprobs(tiny_model_dir: pathlib.Path, adapter: pathlib.Path, tokens: list[int]) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(tiny_model_dir), str(adapter)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].to(torch.float64)
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([float(logp[i - 1, tokens[i]]) for i in range(1, len(tokens))])


def _files(adapter: pathlib.Path) -> dict[str, bytes]:
    return {name: (adapter / name).read_bytes() for name in xw.ADAPTER_FILES}


def _with_tensors(files: dict[str, bytes], change: Any) -> dict[str, bytes]:
    tensors = dict(st_load(files[WEIGHTS]))
    change(tensors)
    return {**files, WEIGHTS: st_save(tensors)}


def _with_config(files: dict[str, bytes], **changes: Any) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def _rest(server: LiveServer, key: str) -> ts.RestClient:
    return ts.RestClient(base_url=server.url, api_key=key, max_retries=0)


# --------------------------------------------------------------------------- happy path


@sqlite_only
def test_uploaded_adapter_samples_and_trains_as_peft_computes_it(
    live_server: LiveServer, server_env: ServerEnv, adapter_dir: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    key = server_env.tenant_key("acme")
    oracle = _oracle_logprobs(tiny_model_dir, adapter_dir, PROMPT)
    with _rest(live_server, key) as rest:
        path = rest.upload_adapter(adapter_dir, base_model=TINY_MODEL, rank=RANK).result(timeout=120)
        assert path.startswith("tinker://upload-") and path.endswith("/external_weights/adapter")

        # Listed by the existing routes as Tinker's "external" type; weights_info knows it.
        run_id = path[len("tinker://") :].split("/")[0]
        listed = rest.list_checkpoints(run_id).result().checkpoints
        assert [(c.checkpoint_type, c.tinker_path) for c in listed] == [("external", path)]
        assert path in {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
        info = rest.get_weights_info_by_tinker_path(path).result()
        assert (info.base_model, info.lora_rank) == (TINY_MODEL, RANK)

        # The certificate (downloaded like any export) says non-private and verifies.
        urls = rest.get_external_weights_urls(path).result().urls
        assert set(urls) == {CONFIG, WEIGHTS, "dp_certificate.json"}
        cert = DpCertificate.from_json_bytes(httpx.get(urls["dp_certificate.json"]).content)
        assert cert.private is False and cert.dp_enabled is False and cert.epsilon is None
        assert any("uploaded" in note for note in cert.notes)
        cert.verify_signature(server_env.keys.deployment_signing_key().verifying_key())
        with pytest.raises(ts.BadRequestError, match="publish"):
            rest.publish_checkpoint_from_tinker_path(path).result()
        privacy = rest.get_privacy(run_id).result()
        assert privacy.dp_enabled is False

    # The uploaded run holds an adapter, not a training state: requests addressed to it are
    # refused when they are submitted, not queued to fail in the worker.
    refused = httpx.post(
        f"{live_server.url}/api/v1/optim_step",
        headers={"X-API-Key": key},
        json={"model_id": run_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-4}},
    )
    assert refused.status_code == 400 and "uploaded adapter" in refused.json()["detail"], refused.text

    with ts.ServiceClient(base_url=live_server.url, api_key=key) as service:
        sampler = service.create_sampling_client(model_path=path).result(timeout=120)
        lps = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result(timeout=120)
        assert lps[0] is None
        np.testing.assert_allclose(np.asarray(lps[1:], dtype=np.float64), oracle, rtol=1e-5, atol=1e-5)

        # load_weights (weights only): the new run computes the uploaded adapter's function.
        training = service.create_training_client_from_state(path).result(timeout=120)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(PROMPT[:-1]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.asarray(PROMPT[1:]))},
        )
        out = training.forward([datum], "cross_entropy").result(timeout=120)
        got = out.loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(got, oracle, rtol=1e-4, atol=1e-4)
        with pytest.raises(ts.BadRequestError, match="optimizer"):
            service.create_training_client_from_state_with_optimizer(path).result(timeout=120)

    with _rest(live_server, key) as rest:
        rest.delete_checkpoint_from_tinker_path(path).result()
        with pytest.raises(ts.NotFoundError):
            rest.get_weights_info_by_tinker_path(path).result()


@sqlite_only
def test_uploaded_weights_are_ciphertext_on_disk(
    live_server: LiveServer, server_env: ServerEnv, adapter_dir: pathlib.Path
) -> None:
    key = server_env.tenant_key("acme")
    files = _files(adapter_dir)
    with _rest(live_server, key) as rest:
        rest.upload_adapter(files, base_model=TINY_MODEL, rank=RANK).result(timeout=120)
    canonical = st_save(
        {k: v.to(torch.float32).contiguous() for k, v in sorted(st_load(files[WEIGHTS]).items())}
    )
    needles = [files[WEIGHTS][-4096:], canonical[-4096:], b'"lora_alpha"']
    stored = [p for p in (server_env.settings.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert stored
    for p in stored:
        blob = p.read_bytes()
        assert not any(n in blob for n in needles), p


# --------------------------------------------------------------------------- refusals


def _tamper_cases() -> dict[str, tuple[Any, str]]:
    def extra(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias"] = torch.zeros(RANK)

    def shape(t: dict[str, torch.Tensor]) -> None:
        name = next(n for n in t if n.endswith("q_proj.lora_A.weight"))
        t[name] = torch.zeros(RANK, t[name].shape[1] + 1)

    def nan(t: dict[str, torch.Tensor]) -> None:
        name = next(n for n in t if n.endswith("v_proj.lora_B.weight"))
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")

    def unknown(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(RANK, 8)

    def integer(t: dict[str, torch.Tensor]) -> None:
        name = next(n for n in t if n.endswith("q_proj.lora_A.weight"))
        t[name] = torch.zeros(t[name].shape, dtype=torch.int32)

    def unpaired(t: dict[str, torch.Tensor]) -> None:
        del t[next(n for n in t if n.endswith("q_proj.lora_B.weight"))]

    return {
        "extra tensor": (extra, "unexpected tensor"),
        "wrong shape": (shape, "has shape"),
        "NaN": (nan, "NaN"),
        "unknown module": (unknown, "names no linear module"),
        "integer dtype": (integer, "float dtype"),
        "unpaired": (unpaired, "but not its pair"),
    }


@sqlite_only
def test_bad_adapters_are_refused_and_audited(
    live_server: LiveServer, server_env: ServerEnv, adapter_dir: pathlib.Path
) -> None:
    key = server_env.tenant_key("acme")
    good = _files(adapter_dir)
    pickled = {**good, WEIGHTS: b"\x80\x04\x95" + secrets.token_bytes(64)}
    zipped = {**good, WEIGHTS: b"PK\x03\x04" + secrets.token_bytes(64)}
    cases: list[tuple[dict[str, bytes], dict[str, Any], str]] = [
        (_with_tensors(good, change), {}, match) for change, match in _tamper_cases().values()
    ]
    cases += [
        (good, {"rank": RANK * 2}, "r is 4, but lora_config.rank is 8"),
        (_with_config(good, r=RANK * 2), {}, "lora_config.rank is 4"),
        (pickled, {}, "pickle"),
        (zipped, {}, "pickle"),
        ({**good, WEIGHTS: secrets.token_bytes(100)}, {}, "not a valid safetensors"),
        (_with_config(good, use_dora=True), {}, "use_dora"),
        (_with_config(good, base_model_name_or_path="meta-llama/Other"), {}, "base_model_name_or_path"),
        (good, {"train_mlp": False}, "does not allow"),
        ({**good, CONFIG: b"not json"}, {}, "JSON"),
    ]
    with _rest(live_server, key) as rest:
        for files, options, match in cases:
            kwargs = {"rank": RANK, **options}
            with pytest.raises(ts.BadRequestError, match=match):
                rest.upload_adapter(files, base_model=TINY_MODEL, **kwargs).result(timeout=120)
        assert rest.list_user_checkpoints().result().checkpoints == []
        actions = [r.action for r in rest.list_audit_records(limit=1000).result().records]
        assert actions.count("api.external_weights_upload_refused") == len(cases)
        # A refused upload is discarded: nothing of it stays in the store.
        assert not [a for a in server_env.store.list("acme") if a.startswith("xw-")]
        with pytest.raises(ts.BadRequestError, match="projects"):
            rest.external_weights_upload_start(
                xw.ExternalWeightsUploadStartRequest(
                    base_model=TINY_MODEL, lora_config=LoraConfig(rank=RANK), destination_project_id="p1"
                )
            ).result()
        with pytest.raises(ts.BadRequestError, match="unknown base model"):
            rest.upload_adapter(good, base_model="nope/model", rank=RANK).result()


@sqlite_only
def test_upload_urls_are_bound_to_tenant_single_use_and_expiring(
    live_server: LiveServer, server_env: ServerEnv, adapter_dir: pathlib.Path
) -> None:
    alice, mallory = server_env.tenant_key("alice"), server_env.tenant_key("mallory")
    files = _files(adapter_dir)
    request = xw.ExternalWeightsUploadStartRequest(base_model=TINY_MODEL, lora_config=LoraConfig(rank=RANK))

    def put(url: str, api_key: str, data: bytes) -> httpx.Response:
        return httpx.put(url, content=data, headers={"X-API-Key": api_key})

    with _rest(live_server, alice) as rest, _rest(live_server, mallory) as other:
        started = rest.external_weights_upload_start(request).result()
        # Another tenant cannot use alice's URL, nor finish her upload.
        response = put(started.urls[CONFIG], mallory, files[CONFIG])
        assert response.status_code == 400 and "signature" in response.json()["detail"]
        with pytest.raises(ts.NotFoundError):
            other.external_weights_upload_finish(started.upload_id).result()
        # Without a key: 401 before the body is read.
        assert httpx.put(started.urls[CONFIG], content=files[CONFIG]).status_code == 401
        # A URL for one file does not accept the other (the file name is signed).
        swapped = started.urls[CONFIG].replace(f"/{CONFIG}?", f"/{WEIGHTS}?")
        assert put(swapped, alice, files[WEIGHTS]).status_code == 400
        # Single use: the second PUT of the same URL is refused, even with the same bytes.
        assert put(started.urls[CONFIG], alice, files[CONFIG]).status_code == 200
        again = put(started.urls[CONFIG], alice, files[CONFIG])
        assert again.status_code == 400 and "already used" in again.json()["detail"]
        # Finishing before every file arrived is refused and names the missing file.
        with pytest.raises(ts.BadRequestError, match=WEIGHTS):
            rest.external_weights_upload_finish(started.upload_id).result()
        assert put(started.urls[WEIGHTS], alice, files[WEIGHTS]).status_code == 200
        path = rest.external_weights_upload_finish(started.upload_id).result().tinker_path
        assert path.endswith("/external_weights/adapter")
        with pytest.raises(ts.NotFoundError):  # finished: the upload id is gone
            rest.external_weights_upload_finish(started.upload_id).result()

        # An expired URL (correctly signed for a past expiry) is refused.
        second = rest.external_weights_upload_start(request).result()
        services = live_server.app.state.services
        past = int(utcnow().timestamp()) - 10
        signature = xws._signature(services, "alice", second.upload_id, CONFIG, past)
        expired = (
            f"{live_server.url}/api/v1/external_weights_uploads/{second.upload_id}/{CONFIG}"
            f"?expires={past}&signature={signature}"
        )
        response = put(expired, alice, files[CONFIG])
        assert response.status_code == 400 and "expired" in response.json()["detail"]
        # A forged expiry (extended without the key) breaks the signature.
        forged = second.urls[CONFIG].replace("expires=", "expires=9")
        assert "signature" in put(forged, alice, files[CONFIG]).json()["detail"]
        # Nothing of alice's is visible to mallory.
        assert other.list_user_checkpoints().result().checkpoints == []

        # Abandoned uploads: the retention sweep deletes those whose URLs have expired (record,
        # files received so far, grants), of every tenant, and nothing else.
        assert put(second.urls[CONFIG], alice, files[CONFIG]).status_code == 200
        third = other.external_weights_upload_start(request).result()
        store = services.store

        def pending(tenant: str, upload_id: str) -> list[str]:
            return sorted(n for n in store.list(tenant) if n.startswith(upload_id + "."))

        def grants(upload_id: str) -> int:
            with services.reads() as session:
                return len(
                    session.execute(
                        select(DownloadToken).where(DownloadToken.checkpoint_id == upload_id)
                    ).all()
                )

        assert pending("alice", second.upload_id) and grants(second.upload_id) == 2
        assert sweep_abandoned_uploads(services) == {}  # nothing has expired yet
        later = utcnow() + _dt.timedelta(seconds=xws.UPLOAD_SECONDS + 60)
        assert sweep_abandoned_uploads(services, now=later) == {"alice": 1, "mallory": 1}
        assert pending("alice", second.upload_id) == [] and grants(second.upload_id) == 0
        assert pending("mallory", third.upload_id) == [] and grants(third.upload_id) == 0
        assert [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints] == [path]


# --------------------------------------------------------------------------- search


def _seed(
    server_env: ServerEnv, tenant: str, metas: list[dict[str, str]], kinds: list[str], *, start: int = 0
) -> list[str]:
    """Checkpoint rows of ``tenant`` (two base models), created in order; returns their ids."""
    ids: list[str] = []
    base = _dt.datetime(2030, 1, 1, tzinfo=_dt.UTC)
    sid = "sess-" + secrets.token_hex(6)
    with server_env.sessions.begin() as db:
        db.add(
            ServerSession(
                id=sid,
                tenant_id=tenant,
                created_at=base,
                last_heartbeat_at=base,
                user_metadata="{}",
                tags="[]",
            )
        )
        db.flush()
        for m, model in enumerate(("model-a", "model-b")):
            db.add(
                TrainingModel(
                    id=f"{sid}:train:{m}",
                    tenant_id=tenant,
                    session_id=sid,
                    model_seq_id=m,
                    base_model=model,
                    lora_rank=4,
                    lora_config="{}",
                    optimizer_config="{}",
                    user_metadata="{}",
                    state="ready",
                    created_at=base,
                    last_request_time=base,
                )
            )
        db.flush()
        for i, (meta, kind) in enumerate(zip(metas, kinds, strict=True)):
            cid = f"ckpt-{i:04d}-{secrets.token_hex(4)}"
            db.add(
                TrainingCheckpoint(
                    id=cid,
                    tenant_id=tenant,
                    model_id=f"{sid}:train:{i % 2}",
                    kind=kind,
                    name=f"c{i}",
                    artifact_id=None,
                    size_bytes=1,
                    public=False,
                    user_metadata=json.dumps(meta),
                    # Ties on purpose: the cursor's id breaks them.
                    created_at=base + _dt.timedelta(seconds=start + i // 3),
                )
            )
            ids.append(cid)
    return ids


_KEYS = st.sampled_from(["team", "stage", "seed"])
_VALUES = st.sampled_from(["a", "b", "c"])
_KINDS = ["weights", "sampler_weights", "external_weights"]
_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


@sqlite_only
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    metas=st.lists(st.dictionaries(_KEYS, _VALUES, max_size=3), min_size=0, max_size=14),
    kind_picks=st.lists(st.integers(0, 2), min_size=14, max_size=14),
    query=st.dictionaries(_KEYS, _VALUES, max_size=2),
    ctype=st.sampled_from([None, "training", "sampler", "external"]),
    bases=st.sampled_from([None, [], ["model-a"], ["model-b", "zzz"], ["model-a", "model-b"]]),
    limit=st.integers(1, 5),
)
def test_search_equals_a_naive_filter_page_by_page(
    server_env: ServerEnv,
    metas: list[dict[str, str]],
    kind_picks: list[int],
    query: dict[str, str],
    ctype: Literal["training", "sampler", "external"] | None,
    bases: list[str] | None,
    limit: int,
) -> None:
    tenant = "t" + secrets.token_hex(4)
    from tensafe.db import Tenant
    from tensafe.server.tenants import create_tenant

    other = "o" + tenant
    with server_env.sessions.begin() as db:
        for name in (tenant, other):
            if db.get(Tenant, name) is None:
                create_tenant(db, name)
    kinds = [_KINDS[k] for k in kind_picks[: len(metas)]]
    ids = _seed(server_env, tenant, metas, kinds)
    _seed(server_env, other, metas, kinds)  # another tenant's identical rows never appear
    # The naive oracle: every row, newest first by (created, id), filtered in Python.
    rows = [
        (i // 3, cid, meta, kind, "model-a" if i % 2 == 0 else "model-b")
        for i, (cid, meta, kind) in enumerate(zip(ids, metas, kinds, strict=True))
    ]
    expected = [
        cid
        for _t, cid, meta, kind, base in sorted(rows, key=lambda r: (r[0], r[1]), reverse=True)
        if all(meta.get(k) == v for k, v in query.items())
        and (ctype is None or _TYPE[kind] == ctype)
        and (bases is None or base in bases)
    ]
    services = _services(server_env)
    who = Principal(tenant=tenant, key_id="key_test")
    got: list[str] = []
    cursor = None
    for _ in range(40):
        page = xws.search_checkpoints(
            services,
            who,
            xw.CheckpointSearchRequest(
                user_metadata=query, checkpoint_type=ctype, base_models=bases, limit=limit, cursor=cursor
            ),
        )
        assert len(page.checkpoints) <= limit
        got += [_id_of(services, tenant, c.tinker_path) for c in page.checkpoints]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == expected


def _services(server_env: ServerEnv) -> Any:
    from tensafe.server.jobs import Services

    return Services(sessions=server_env.sessions, store=server_env.store, signer=None, checkpoint_every=1000)


def _id_of(services: Any, tenant: str, path: str) -> str:
    run, kind, name = path[len("tinker://") :].split("/")
    with services.sessions() as db:
        row = db.query(TrainingCheckpoint).filter_by(model_id=run, kind=kind, name=name).one()
        assert row.tenant_id == tenant
        return str(row.id)


@sqlite_only
def test_search_is_stable_under_inserts_and_refuses_other_owners(server_env: ServerEnv) -> None:
    from tensafe.server.tenants import create_tenant

    with server_env.sessions.begin() as db:
        create_tenant(db, "searcher")
    _seed(server_env, "searcher", [{"k": "v"}] * 6, ["weights"] * 6)
    services = _services(server_env)
    who = Principal(tenant="searcher", key_id="key_test")
    before = [
        c.tinker_path for c in xws.search_checkpoints(services, who, xw.CheckpointSearchRequest()).checkpoints
    ]
    first = xws.search_checkpoints(services, who, xw.CheckpointSearchRequest(limit=3))
    _seed(server_env, "searcher", [{"k": "v"}] * 3, ["weights"] * 3, start=100)  # newer rows arrive
    second = xws.search_checkpoints(
        services, who, xw.CheckpointSearchRequest(limit=3, cursor=first.next_cursor)
    )
    assert [c.tinker_path for c in first.checkpoints + second.checkpoints] == before
    assert second.next_cursor is None
    for bad, match in (({"owner": "someone-else"}, "owner"), ({"project_ids": ["p"]}, "projects")):
        with pytest.raises(BadRequestError, match=match):
            xws.search_checkpoints(services, who, xw.CheckpointSearchRequest(**bad))
    assert xws.search_checkpoints(services, who, xw.CheckpointSearchRequest(base_models=[])).checkpoints == []
    stranger = Principal(tenant="nobody", key_id="key_x")
    assert xws.search_checkpoints(services, stranger, xw.CheckpointSearchRequest()).checkpoints == []


@sqlite_only
def test_search_route_answers_through_the_sdk(live_server: LiveServer, server_env: ServerEnv) -> None:
    key = server_env.tenant_key("acme")
    with _rest(live_server, key) as rest:
        page = rest.search_checkpoints(xw.CheckpointSearchRequest(checkpoint_type="external")).result()
        assert page.checkpoints == [] and page.next_cursor is None
        with pytest.raises(ts.BadRequestError, match="owner"):
            rest.search_checkpoints(xw.CheckpointSearchRequest(owner="root")).result()


# --------------------------------------------------------------------------- parser fuzz


_SHAPES = {"model.layers.0.self_attn.q_proj": (8, 8)}


@settings(max_examples=300, deadline=None)
@given(config=st.binary(max_size=200), weights=st.binary(max_size=400))
def test_verify_adapter_refuses_arbitrary_bytes_with_a_400(config: bytes, weights: bytes) -> None:
    with pytest.raises(BadRequestError):
        xws.verify_adapter(
            config,
            weights,
            base_model=TINY_MODEL,
            shapes=_SHAPES,
            rank=2,
            train_attn=True,
            train_mlp=True,
            train_unembed=False,
        )


@settings(max_examples=200, deadline=None)
@given(header=st.binary(max_size=300), n=st.integers(0, 2**20))
def test_verify_adapter_refuses_malformed_safetensors_headers(header: bytes, n: int) -> None:
    config = json.dumps({"r": 2, "peft_type": "LORA"}).encode()
    weights = n.to_bytes(8, "little") + header
    with pytest.raises(BadRequestError):
        xws.verify_adapter(
            config,
            weights,
            base_model=TINY_MODEL,
            shapes=_SHAPES,
            rank=2,
            train_attn=True,
            train_mlp=True,
            train_unembed=False,
        )


def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_is_parsed() -> None:
    """The header length's first byte can be 0x80 (pickle's protocol opcode): still safetensors."""
    import torch
    from safetensors.torch import save

    from tensafe.server.external_weights import _parse_safetensors

    tensor = {"w": torch.arange(4, dtype=torch.float32)}
    data = next(d for pad in range(600) if (d := save(tensor, metadata={"pad": "x" * pad}))[0] == 0x80)
    assert torch.equal(_parse_safetensors(data)["w"], tensor["w"])
    with pytest.raises(Exception, match="pickle"):
        _parse_safetensors(b"\x80\x04\x95" + b"\0" * 64)
