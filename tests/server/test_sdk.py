"""The official ``tinker==0.38.0`` SDK, unmodified, against a live TenSafe server."""

from __future__ import annotations

import pytest

from server.conftest import TINY_MODEL, LiveServer, ServerEnv

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")


def test_official_sdk_session_model_info_tokenizer_and_rest(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=live_server.url, api_key=key)
    try:
        training = service.create_lora_training_client(
            base_model=TINY_MODEL, rank=4, user_metadata={"renderer_name": "role_colon"}
        ).result()
        model_id = training.model_id
        assert model_id.endswith(":train:0")
        info = training.get_info()
        assert info.model_data.model_name == TINY_MODEL and info.lora_rank == 4
        tokenizer = training.get_tokenizer()
        ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
        assert tokenizer.decode(ids) == "The capital of France is"

        rest = tinker.RestClient(base_url=live_server.url, api_key=key)
        caps = rest.get_server_capabilities().result()
        assert [m.model_name for m in caps.supported_models] == [TINY_MODEL]

        runs = rest.list_training_runs().result()
        assert [r.training_run_id for r in runs.training_runs] == [model_id]
        assert runs.cursor.total_count == 1
        run = rest.get_training_run(model_id).result()
        assert run.base_model == TINY_MODEL and run.user_metadata == {"renderer_name": "role_colon"}
        assert rest.list_checkpoints(model_id).result().checkpoints == []
        session_id = model_id.split(":train:")[0]
        assert session_id in rest.list_sessions().result().sessions
        assert rest.get_session(session_id).result().training_run_ids == [model_id]

        # A second training client in the same session gets the next model_seq_id.
        second = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        assert second.model_id == f"{session_id}:train:1"
    finally:
        service.close("success").result()


def test_official_sdk_rejects_unknown_model_and_bad_key(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=live_server.url, api_key=key)
    try:
        with pytest.raises(tinker.BadRequestError, match="unknown base model"):
            service.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
    finally:
        service.close("success").result()
    intruder = tinker.ServiceClient(base_url=live_server.url, api_key="tml-" + "x" * 43)
    with pytest.raises(tinker.AuthenticationError):
        intruder.create_lora_training_client(base_model=TINY_MODEL, rank=4).result()


def test_official_sdk_training_requests_are_stored_encrypted_and_run_in_order(
    live_server: LiveServer, server_env: ServerEnv
) -> None:
    """The protobuf body is decoded, stored encrypted under the tenant's DEK and run in seq_id order."""
    from sqlalchemy import select

    from tensafe.server.models import FutureRow

    key = server_env.tenant_key("acme")
    service = tinker.ServiceClient(base_url=live_server.url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4).result()
        data = [
            tinker.types.Datum(
                model_input=tinker.types.ModelInput.from_ints([101 + i, 102, 103]),
                loss_fn_inputs={"target_tokens": [102, 103, 104], "weights": [0.0, 1.0, 1.0]},
            )
            for i in range(2)  # two privacy units (a repeat within a step would be refused)
        ]
        fwd = training.forward_backward(data, "cross_entropy")
        opt = training.optim_step(tinker.types.AdamParams(learning_rate=1e-4))
        assert len(fwd.result().loss_fn_outputs) == 2
        assert opt.result().metrics is not None
    finally:
        service.close("success").result()
    with server_env.sessions() as s:
        rows = s.execute(select(FutureRow).order_by(FutureRow.seq_id)).scalars().all()
    assert [(r.seq_id, r.request_type, r.state) for r in rows] == [
        (0, "create_model", "complete"),
        (1, "forward_backward", "complete"),
        (2, "optim_step", "complete"),
    ]
    assert [r.started_at for r in rows] == sorted(r.started_at for r in rows)  # type: ignore[type-var]
    fb = rows[1]
    assert fb.payload_json == '{"loss_fn": "cross_entropy", "num_datums": 2}'
    # The training data was staged encrypted and deleted once the request completed.
    assert fb.payload_ref is None
    assert not [a for a in server_env.store.list("acme") if a.startswith("payload-")]
    assert rows[2].payload_json is not None and '"learning_rate": 0.0001' in rows[2].payload_json
