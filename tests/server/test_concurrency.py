"""Eight training runs through the official SDK at once: no step lost, none reordered."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL, ServerEnv
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.privacy import OperatorPrivacy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

RUNS, STEPS = 8, 3
LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)


@pytest.mark.slow
def test_eight_concurrent_runs_finish_in_order(start_server: Any, server_env: ServerEnv) -> None:
    server = start_server(privacy=LOOSE)
    keys = [server_env.tenant_key(f"tenant{i % 2}") for i in range(RUNS)]  # two tenants, interleaved
    model_ids: list[str | None] = [None] * RUNS
    errors: list[BaseException] = []
    barrier = threading.Barrier(RUNS)

    def run(i: int) -> None:
        service = tinker.ServiceClient(base_url=server.url, api_key=keys[i])
        try:
            training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
            model_ids[i] = training.model_id
            tokens = [1, 10 + i, 20 + i, 30 + i, 40 + i]
            datum = tinker.types.Datum(
                model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 4},
            )
            barrier.wait(120)
            for _ in range(STEPS):
                # Submit without waiting: the server must keep each model's order itself.
                fb = training.forward_backward([datum], "cross_entropy")
                opt = training.optim_step(tinker.types.AdamParams(learning_rate=1e-2))
                fb.result()
                opt.result()
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)
        finally:
            service.close("success").result()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RUNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert all(m is not None for m in model_ids) and len(set(model_ids)) == RUNS
    with server_env.sessions() as s:
        for model_id in model_ids:
            row = s.get(TrainingModel, model_id)
            assert row is not None and row.step == STEPS and row.state_seq_id == 2 * STEPS
            futures = (
                s.execute(select(FutureRow).where(FutureRow.model_id == model_id).order_by(FutureRow.seq_id))
                .scalars()
                .all()
            )
            assert [f.state for f in futures] == ["complete"] * (1 + 2 * STEPS)
            assert [f.request_type for f in futures] == ["create_model"] + [
                "forward_backward",
                "optim_step",
            ] * STEPS
            starts = [f.started_at for f in futures]
            assert starts == sorted(starts)  # type: ignore[type-var]
