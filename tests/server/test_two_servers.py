"""Two API servers on one database: one only serves, the other also runs the worker.

Both are separate application instances (own worker, own session table, own long-poll
waiters) that share only the database and the encrypted store, as two processes would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from server.conftest import TINY_MODEL, ServerEnv
from tensafe.server.models import FutureRow, TrainingModel
from tensafe.server.privacy import OperatorPrivacy

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

LOOSE = OperatorPrivacy(
    target_epsilon=50.0, delta=1e-3, clip_norm=10.0, dataset_size=64, expected_batch_size=8, max_steps=40
)


def _datum() -> Any:
    tokens = [1, 17, 23, 42, 99]
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 4},
    )


@pytest.mark.slow
def test_api_only_server_and_worker_server_share_the_runs(start_server: Any, server_env: ServerEnv) -> None:
    front = start_server(privacy=LOOSE, run_worker=False)
    back = start_server(privacy=LOOSE)
    key = server_env.tenant_key("acme")
    a = tinker.ServiceClient(base_url=front.url, api_key=key)
    b = tinker.ServiceClient(base_url=back.url, api_key=key)
    try:
        via_front = a.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        via_back = b.create_lora_training_client(base_model=TINY_MODEL, rank=2).result()
        for _ in range(2):
            for training in (via_front, via_back):
                training.forward_backward([_datum()], "cross_entropy").result()
                training.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
        path = via_front.save_state("shared").result().path
        # A client of the other server resumes the run saved through the first one.
        resumed = b.create_training_client_from_state_with_optimizer(path).result()
        x = via_front.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        y = resumed.forward([_datum()], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_array_equal(x, y)
    finally:
        a.close("success").result()
        b.close("success").result()
    assert front.app.state.compute.loaded_models() == []  # the API-only server ran nothing
    with server_env.sessions() as s:
        for model_id in (via_front.model_id, via_back.model_id):
            row = s.get(TrainingModel, model_id)
            assert row is not None and row.step == 2
        workers = {f.worker_id for f in s.execute(select(FutureRow)).scalars()}
    assert workers == {back.app.state.worker.worker_id}
