"""Checkpoint lifecycle through the official ``tinker==0.38.0`` SDK and CLI against a live server.

Covers ``save_weights_external`` (PEFT export, DP certificate, age encryption),
``external_weights_urls`` and the token downloads, publish/unpublish (TenSafe's DP-only
rule), TTLs and the expiry sweeper, tenant isolation of every new route, the AdamW-only
optimizer rule and ``forward_backward_custom``.

Oracles: PEFT loads the downloaded adapter into the base model with ``transformers`` and
must reproduce the server's ``forward`` log-probabilities; age files are decrypted with
``pyrage`` (the identity) and with the ``age`` command-line tool (an independent
implementation); the DP certificate's ε is compared with the run's certificate endpoint;
the custom loss with one computed from the base model's log-probabilities.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select, update

from server.conftest import LOOSE, TINY_MODEL, LiveServer, ServerEnv
from tensafe.server.privacy import set_tenant_policy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")
pyrage = pytest.importorskip("pyrage", reason="pyrage==1.4.0 is a server dependency")

TOKENS = [1, 17, 23, 42, 99, 7]
PROBE = [1, 300, 301, 302, 303, 304]
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _datum(tokens: list[int], weights: list[float] | None = None) -> Any:
    inputs: dict[str, Any] = {"target_tokens": tokens[1:]}
    if weights is not None:
        inputs["weights"] = weights
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs
    )


def _base_logprobs(
    model_dir: pathlib.Path, tokens: list[int], adapter: pathlib.Path | None = None
) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]])).logits[0]
    lp = torch.log_softmax(logits.double(), dim=-1)
    return lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy()


def _tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def _fetch(urls: dict[str, str], directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, url in urls.items():
        response = httpx.get(url)  # no API key: the URL is the capability
        assert response.status_code == 200, response.text
        assert response.headers["content-length"] == str(len(response.content))
        (directory / name).write_bytes(response.content)


def _audit_actions(server: LiveServer, key: str) -> list[str]:
    body = httpx.get(
        f"{server.url}/api/v1/tensafe/audit/records", params={"limit": 1000}, headers={"X-API-Key": key}
    ).json()
    return [r["action"] for r in body["records"]]


def _cli(server: LiveServer, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TINKER_BASE_URL": server.url, "TINKER_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "tinker.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def loose_server(start_server: Any) -> LiveServer:
    server: LiveServer = start_server(privacy=LOOSE)
    return server


@sqlite_only
def test_external_weights_export_download_publish_ttl_and_isolation(
    loose_server: LiveServer, server_env: ServerEnv, tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    url = loose_server.url
    key = server_env.tenant_key("acme")
    other = server_env.tenant_key("other")
    service = tinker.ServiceClient(base_url=url, api_key=key)
    rest = tinker.RestClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=5).result()
        run = training.model_id
        training.forward_backward([_datum(TOKENS, [1.0] * 5)], "cross_entropy").result()
        training.optim_step(tinker.types.AdamParams(learning_rate=5e-2)).result()
        state_path = training.save_state("after-one-step").result().path

        # -- export: PEFT files and the DP certificate, as a listed checkpoint -------------
        path = training.save_weights_external("exp1").result().path
        assert path == f"tinker://{run}/external_weights/exp1"
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(run).result().checkpoints}
        ckpt = listed["external_weights/exp1"]
        assert ckpt.checkpoint_type == "external" and ckpt.public is False and ckpt.expires_at is None
        assert rest.get_weights_info_by_tinker_path(path).result().lora_rank == 4

        signed = rest.get_external_weights_urls(path).result()
        assert set(signed.urls) == ADAPTER | {"dp_certificate.json"}
        assert all(u.startswith(f"{url}/api/v1/downloads/") for u in signed.urls.values())
        now = _dt.datetime.now(_dt.UTC)
        assert now + _dt.timedelta(minutes=14) < signed.expires <= now + _dt.timedelta(minutes=15, seconds=5)
        plain = tmp_path / "plain"
        _fetch(signed.urls, plain)
        assert ckpt.size_bytes == sum(f.stat().st_size for f in plain.iterdir())

        # Oracle: PEFT + transformers on the downloaded adapter reproduce the server's forward.
        served = training.forward([_datum(PROBE, [1.0] * 5)], "cross_entropy").result()
        served_lp = np.asarray(served.loss_fn_outputs[0]["logprobs"].to_numpy(), dtype=np.float64)
        np.testing.assert_allclose(
            _base_logprobs(tiny_model_dir, PROBE, adapter=plain), served_lp, rtol=1e-4, atol=1e-4
        )
        assert not np.allclose(_base_logprobs(tiny_model_dir, PROBE), served_lp, atol=1e-5)  # it trained

        certificate = json.loads((plain / "dp_certificate.json").read_text())
        reference = httpx.get(
            f"{url}/api/v1/tensafe/training_runs/{run}/certificate", headers={"X-API-Key": key}
        )
        assert certificate["epsilon"] == pytest.approx(reference.json()["epsilon"])
        assert 0 < certificate["epsilon"] < float("inf") and certificate["steps"] == 1

        # -- age: files are age-encrypted to the recipients, named *.age -------------------
        identity = pyrage.x25519.Identity.generate()
        ssh_key = Ed25519PrivateKey.generate()
        ssh_public = ssh_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        ssh_private = ssh_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        recipients = [str(identity.to_public()), ssh_public.decode()]
        enc_path = training.save_weights_external("enc", age_encryption_recipients=recipients).result().path
        enc_urls = rest.get_external_weights_urls(enc_path).result().urls
        assert set(enc_urls) == {f"{n}.age" for n in ADAPTER | {"dp_certificate.json"}}
        encrypted = tmp_path / "encrypted"
        _fetch(enc_urls, encrypted)
        for name in ADAPTER:
            blob = (encrypted / f"{name}.age").read_bytes()
            assert blob.startswith(b"age-encryption.org/v1\n") and blob != (plain / name).read_bytes()
            assert pyrage.decrypt(blob, [identity]) == (plain / name).read_bytes()
        # The age CLI (Go implementation) decrypts with the X25519 identity and the SSH key.
        age = shutil.which("age")
        assert age is not None, "the age CLI is installed by scripts/test.sh"
        (tmp_path / "age.key").write_text(str(identity) + "\n")
        (tmp_path / "id_ed25519").write_bytes(ssh_private)
        (tmp_path / "id_ed25519").chmod(0o600)
        for ident in ("age.key", "id_ed25519"):
            out = subprocess.run(
                [age, "-d", "-i", str(tmp_path / ident), str(encrypted / "adapter_model.safetensors.age")],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
            assert out == (plain / "adapter_model.safetensors").read_bytes()

        with pytest.raises(tinker.RequestFailedError, match="age recipient #2 is invalid") as bad:
            training.save_weights_external(
                "bad", age_encryption_recipients=[recipients[0], "age1qqqq"]
            ).result()
        assert bad.value.category == "user"
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            training.save_weights_external("exp1").result()

        # -- publish (the run trained with DP), unpublish, TTL ---------------------------
        rest.publish_checkpoint_from_tinker_path(path).result()
        assert {c.checkpoint_id: c.public for c in rest.list_checkpoints(run).result().checkpoints}[
            "external_weights/exp1"
        ]
        rest.unpublish_checkpoint_from_tinker_path(path).result()
        assert not {c.checkpoint_id: c.public for c in rest.list_user_checkpoints().result().checkpoints}[
            "external_weights/exp1"
        ]
        rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
        expires = {c.checkpoint_id: c.expires_at for c in rest.list_checkpoints(run).result().checkpoints}
        left = (expires["external_weights/exp1"] - _dt.datetime.now(_dt.UTC)).total_seconds()
        assert 7100 < left <= 7200
        rest.set_checkpoint_ttl_from_tinker_path(path, None).result()
        assert {c.checkpoint_id: c.expires_at for c in rest.list_checkpoints(run).result().checkpoints}[
            "external_weights/exp1"
        ] is None
        with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be between"):
            rest.set_checkpoint_ttl_from_tinker_path(path, 60).result()
        actions = _audit_actions(loose_server, key)
        for action in (
            "api.save_weights_external",
            "api.external_weights_urls",
            "api.download",
            "api.publish_checkpoint",
            "api.unpublish_checkpoint",
            "api.set_checkpoint_ttl",
        ):
            assert action in actions

        # Download URLs exist only for external weights (the SDK refuses client-side; raw call).
        weights_urls = httpx.get(
            f"{url}/api/v1/training_runs/{run}/checkpoints/weights/after-one-step/external_weights_urls",
            headers={"X-API-Key": key},
        )
        assert weights_urls.status_code == 400 and "external_weights" in weights_urls.json()["detail"]
        assert httpx.get(f"{url}/api/v1/downloads/{'A' * 43}").status_code == 404

        # -- tenant isolation: every new route is a 404 for another tenant -----------------
        intruder = {"X-API-Key": other}
        ck = f"{url}/api/v1/training_runs/{run}/checkpoints/external_weights/exp1"
        assert httpx.get(f"{ck}/external_weights_urls", headers=intruder).status_code == 404
        assert httpx.post(f"{ck}/publish", headers=intruder).status_code == 404
        assert httpx.delete(f"{ck}/publish", headers=intruder).status_code == 404
        assert httpx.put(f"{ck}/ttl", json={"ttl_seconds": 3600}, headers=intruder).status_code == 404
        assert httpx.delete(ck, headers=intruder).status_code == 404
        stolen = httpx.post(
            f"{url}/api/v1/save_weights_external",
            json={"model_id": run, "path": "steal", "seq_id": 99, "type": "save_weights_external"},
            headers=intruder,
        )
        assert stolen.status_code == 404
        assert httpx.get(f"{ck}/external_weights_urls").status_code == 401  # no key at all

        # -- the official CLI: external weights, and a training checkpoint (exported) ------
        done = _cli(loose_server, key, "checkpoint", "download", path, "--output", str(tmp_path / "cli"))
        assert done.returncode == 0, done.stderr
        got = tmp_path / "cli" / path.replace("tinker://", "").replace("/", "_")
        assert {f.name for f in got.iterdir()} == ADAPTER | {"dp_certificate.json"}
        for name in ADAPTER:
            assert (got / name).read_bytes() == (plain / name).read_bytes()
        done = _cli(
            loose_server, key, "checkpoint", "download", state_path, "--output", str(tmp_path / "cli")
        )
        assert done.returncode == 0, done.stderr
        got = tmp_path / "cli" / state_path.replace("tinker://", "").replace("/", "_")
        exported, original = (
            _tensors(got / "adapter_model.safetensors"),
            _tensors(plain / "adapter_model.safetensors"),
        )
        assert exported.keys() == original.keys() and exported
        for name, tensor in original.items():
            np.testing.assert_array_equal(exported[name], tensor)
        # The CLI deleted its temporary export again.
        temporary = [
            c
            for c in rest.list_user_checkpoints().result().checkpoints
            if c.checkpoint_id.endswith("/download")
        ]
        assert temporary == []

        # -- delete: URLs and artifacts are gone -----------------------------------------
        with server_env.sessions() as s:
            from tensafe.server.models import TrainingCheckpoint

            ref = s.execute(
                select(TrainingCheckpoint.artifact_id).where(TrainingCheckpoint.name == "exp1")
            ).scalar_one()
        assert ref is not None and any(a.startswith(ref + ".") for a in server_env.store.list("acme"))
        fresh = rest.get_external_weights_urls(path).result().urls
        rest.delete_checkpoint_from_tinker_path(path).result()
        assert httpx.get(fresh["adapter_model.safetensors"]).status_code == 404
        assert not any(a.startswith(ref) for a in server_env.store.list("acme"))
        with pytest.raises(tinker.NotFoundError):
            rest.get_external_weights_urls(path).result()
    finally:
        service.close("success").result()


@pytest.fixture
def sweeping_server(start_server: Any, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    import tensafe.server.retention as lifecycle

    monkeypatch.setattr(lifecycle, "SWEEP_INTERVAL_SECONDS", 0.2)
    server: LiveServer = start_server(privacy=LOOSE)
    return server


def test_expired_checkpoints_are_invisible_then_swept(
    sweeping_server: LiveServer, server_env: ServerEnv
) -> None:
    from tensafe.audit.models import AuditRecordRow
    from tensafe.server.models import DownloadToken, TrainingCheckpoint
    from tensafe.server.retention import sweep_expired_checkpoints

    url, key = sweeping_server.url, server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=url, api_key=key)
    rest = tinker.RestClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        run = training.model_id
        state = training.save_state("short", ttl_seconds=3600).result().path
        keep = training.save_state("keep").result().path
        external = training.save_weights_external("ext", ttl_seconds=3600).result().path
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(run).result().checkpoints}
        left = (listed["weights/short"].expires_at - _dt.datetime.now(_dt.UTC)).total_seconds()
        assert 3500 < left <= 3600 and listed["external_weights/ext"].expires_at is not None
        link = rest.get_external_weights_urls(external).result().urls["adapter_model.safetensors"]
        assert httpx.get(link).status_code == 200

        # An hour passes (for these two checkpoints): they vanish at once, before any sweep.
        past = _dt.datetime.now(_dt.UTC) - _dt.timedelta(seconds=1)
        with server_env.sessions.begin() as s:
            s.execute(
                update(TrainingCheckpoint)
                .where(TrainingCheckpoint.name.in_(("short", "ext")))
                .values(expires_at=past)
            )
            refs = dict(s.execute(select(TrainingCheckpoint.name, TrainingCheckpoint.artifact_id)).all())
        ids = {c.checkpoint_id for c in rest.list_checkpoints(run).result().checkpoints}
        assert ids == {"weights/keep"}
        assert {c.checkpoint_id for c in rest.list_user_checkpoints().result().checkpoints} == {
            "weights/keep"
        }
        for gone in (state, external):
            with pytest.raises(tinker.NotFoundError):
                rest.get_weights_info_by_tinker_path(gone).result()
            with pytest.raises(tinker.NotFoundError):
                rest.set_checkpoint_ttl_from_tinker_path(gone, None).result()
        with pytest.raises(tinker.NotFoundError):
            service.create_training_client_from_state(state).result()
        assert httpx.get(link).status_code == 404
        assert service.create_training_client_from_state(keep).result().model_id != run

        # The worker loop's sweeper deletes the rows and their encrypted artifacts, audited.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with server_env.sessions() as s:
                names = set(s.execute(select(TrainingCheckpoint.name)).scalars())
            if names == {"keep"}:
                break
            time.sleep(0.1)
        assert names == {"keep"}
        artifacts = server_env.store.list("acme")
        for name in ("short", "ext"):
            assert not any(a == refs[name] or a.startswith(f"{refs[name]}.") for a in artifacts)
        assert any(a == refs["keep"] for a in artifacts)
        with server_env.sessions() as s:
            swept = s.execute(
                select(AuditRecordRow.resource).where(AuditRecordRow.action == "system.checkpoint_expired")
            ).scalars()
            assert set(swept) == {state, external}
            assert s.execute(select(DownloadToken)).first() is not None  # its URL is not yet expired

        # A TTL extended in time saves a checkpoint; a second sweep finds nothing.
        later = _dt.datetime.now(_dt.UTC) + _dt.timedelta(hours=3)
        assert sweep_expired_checkpoints(server_env_services(sweeping_server), now=later) == 0
        rest.set_checkpoint_ttl_from_tinker_path(keep, 3600).result()
        assert sweep_expired_checkpoints(server_env_services(sweeping_server), now=later) == 1
        with server_env.sessions() as s:
            assert s.execute(select(TrainingCheckpoint)).first() is None
            assert s.execute(select(DownloadToken)).first() is None  # expired tokens are swept too
    finally:
        service.close("success").result()


def server_env_services(server: LiveServer) -> Any:
    return server.app.state.services


@sqlite_only
def test_publish_needs_dp_optimizers_other_than_adamw_are_refused_and_custom_loss(
    loose_server: LiveServer, server_env: ServerEnv, tiny_model_dir: pathlib.Path
) -> None:
    import torch

    from tensafe.server.models import TrainingModel

    key = server_env.tenant_key("acme")
    with server_env.sessions.begin() as s:
        set_tenant_policy(
            s,
            "acme",
            target_epsilon=50.0,
            delta=1e-3,
            clip_norm=10.0,
            allow_non_private=True,
            dataset_size=64,
            expected_batch_size=8,
            max_steps=40,
        )
    service = tinker.ServiceClient(base_url=loose_server.url, api_key=key)
    rest = tinker.RestClient(base_url=loose_server.url, api_key=key)
    try:
        # A non-private run's checkpoint cannot be published.
        plain = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, user_metadata={"tensafe.dp.enabled": "false"}
        ).result()
        path = plain.save_state("np").result().path
        with pytest.raises(tinker.BadRequestError, match="differential privacy") as refused:
            rest.publish_checkpoint_from_tinker_path(path).result()
        assert refused.value.status_code == 400
        assert not rest.list_checkpoints(plain.model_id).result().checkpoints[0].public

        # Only AdamW: at create_model, at create-via-load and at optim_step; never silently.
        dimuon = tinker.types.DimuonOptimizerConfig()
        with pytest.raises(tinker.BadRequestError, match="AdamW"):
            service.create_lora_training_client(base_model=TINY_MODEL, rank=2, optimizer=dimuon).result()
        with pytest.raises(tinker.BadRequestError, match="AdamW"):
            service.create_training_client_from_state(path, optimizer=dimuon).result()
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        with pytest.raises(tinker.RequestFailedError, match="only AdamW") as failed:
            training.optim_step(tinker.types.DimuonParams(learning_rate=0.01)).result()
        assert failed.value.category == "user"
        with server_env.sessions() as s:
            row = s.get(TrainingModel, training.model_id)
            assert row is not None and row.step == 0  # no step was taken

        # forward_backward_custom: forward + weighted cross_entropy, loss computed client-side.
        data = [_datum(TOKENS), _datum(PROBE)]

        def loss_fn(_data: list[Any], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            loss = sum((lp.double() ** 2).sum() for lp in logprobs)
            assert isinstance(loss, torch.Tensor)
            return loss, {"squares": float(loss.detach())}

        out = training.forward_backward_custom(data, loss_fn).result()
        naive = sum(float((_base_logprobs(tiny_model_dir, t) ** 2).sum()) for t in (TOKENS, PROBE))
        assert out.metrics["loss:sum"] == pytest.approx(naive, rel=1e-4)
        assert out.metrics["squares"] == pytest.approx(naive, rel=1e-4)
        # The server's surrogate is sum(-lp * w) with w = -dC/dlp = -2 lp: it equals 2 * C.
        assert out.metrics["surrogate_loss:sum"] == pytest.approx(2 * naive, rel=1e-3)
        step = training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        assert step.metrics is not None and "grad_norm:mean" in step.metrics
    finally:
        service.close("success").result()


def test_download_tokens_are_redacted_from_the_access_log() -> None:
    import logging

    import tensafe.server.routers.checkpoints  # noqa: F401  (installs the filter)

    token = "Zk3" + "x" * 40
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/api/v1/downloads/{token}", "1.1", 200),
        None,
    )
    assert logging.getLogger("uvicorn.access").filter(record)
    message = record.getMessage()
    assert token not in message and "/api/v1/downloads/<redacted>" in message
