"""``tensafe.client``'s checkpoint calls and ``forward_backward_custom`` against a live server.

Covers the RestClient's ``get_weights_info_by_tinker_path``, ``get_external_weights_urls``,
``delete_checkpoint[_from_tinker_path]``, ``publish_/unpublish_checkpoint_from_tinker_path``,
``set_checkpoint_ttl_from_tinker_path`` and ``get_sampler``, and the TrainingClient's
``save_weights_external`` and NumPy ``forward_backward_custom``.

Oracles: the official ``tinker==0.38.0`` SDK making the same calls against the same server
(its answers, its errors, its own export of the same weights and its torch custom loss);
``pyrage`` for age-encrypted files; NumPy for the custom loss; the server's futures table for
the order in which requests ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import json
import pathlib
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from server.conftest import LOOSE, TINY_MODEL, LiveServer, ServerEnv
from tensafe import client as ts
from tensafe.client import types
from tensafe.client._custom_loss import backward_data, compute_custom_loss, forward_data, merge_metrics

tinker = pytest.importorskip("tinker", reason="the official tinker SDK is a test dependency (tinker==0.38.0)")

TOKENS = [1, 17, 23, 42, 99, 7]
PROBE = [1, 300, 301, 302, 303, 304]
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _datum(tokens: list[int], **inputs: Any) -> types.Datum:
    loss_fn_inputs: dict[str, Any] = {"target_tokens": tokens[1:], **inputs}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_fn_inputs)


def _tinker_datum(tokens: list[int]) -> Any:
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


def _fetch(urls: dict[str, str], directory: pathlib.Path) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for name, url in urls.items():
        response = httpx.get(url)  # a plain GET: the URL is the capability
        assert response.status_code == 200, response.text
        (directory / name).write_bytes(response.content)
        files[name] = response.content
    return files


def _tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def _squares(
    _data: list[types.Datum], logprobs: list[np.ndarray]
) -> tuple[float, dict[str, float], list[np.ndarray]]:
    loss = float(sum(float((lp**2).sum()) for lp in logprobs))
    return loss, {"squares": loss}, [2.0 * lp for lp in logprobs]


@pytest.fixture
def loose_server(start_server: Any) -> LiveServer:
    server: LiveServer = start_server(privacy=LOOSE)
    return server


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    "path",
    [
        "tinker://s:train:0/weights/final",
        "tinker://s:train:0/sampler_weights/x.1",
        "tinker://s:train:0/external_weights/e",
        "tinker://s:train:0/archives/e",
        "tinker://s:train:0/weights",
        "tinker://s/weights/a/b",
        "http://s/weights/a",
    ],
)
def test_tinker_paths_parse_as_the_official_sdk_parses_them(path: str) -> None:
    try:
        expected = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(path).model_dump()
    except ValueError:
        with pytest.raises(ValueError):
            types.ParsedCheckpointTinkerPath.from_tinker_path(path)
        return
    assert types.ParsedCheckpointTinkerPath.from_tinker_path(path).model_dump() == expected


def test_bad_paths_are_refused_before_any_request() -> None:
    # Nothing listens on port 9: a request would be a connection error, not a ValueError.
    rest = ts.RestClient(base_url="http://127.0.0.1:9", api_key="tml-" + "k" * 43, max_retries=0)
    try:
        with pytest.raises(ValueError, match="external weights"):
            rest.get_external_weights_urls("tinker://s:train:0/weights/final")
        with pytest.raises(ValueError, match="external weights"):
            asyncio.run(rest.get_external_weights_urls_async("tinker://s:train:0/sampler_weights/x"))
        for bad in ("weights", "weights/a/b", "archives/x", "weights/..", ""):
            with pytest.raises(ValueError, match="checkpoint id"):
                rest.delete_checkpoint("s:train:0", bad)
        for call in (
            rest.delete_checkpoint_from_tinker_path,
            rest.publish_checkpoint_from_tinker_path,
            rest.unpublish_checkpoint_from_tinker_path,
            rest.get_weights_info_by_tinker_path,
            lambda p: rest.set_checkpoint_ttl_from_tinker_path(p, 3600),
        ):
            with pytest.raises(ValueError, match="tinker://"):
                call("s:train:0/weights/final")
        with pytest.raises(ts.APIConnectionError):
            rest.get_sampler("s:sample:0").result(timeout=30)
    finally:
        rest.close()


def test_custom_loss_data_and_checks() -> None:
    data = [_datum(TOKENS), _datum(PROBE, weights=[0.0, 1.0, 1.0, 1.0, 1.0])]
    fwd = forward_data(data)
    assert [sorted(d.loss_fn_inputs) for d in fwd] == [["target_tokens", "weights"]] * 2
    assert fwd[0].loss_fn_inputs["weights"].to_numpy().tolist() == [0.0] * 5  # zeros when absent
    assert fwd[1].loss_fn_inputs["weights"] == data[1].loss_fn_inputs["weights"]
    with pytest.raises(ValueError, match="target_tokens"):
        forward_data([types.Datum(model_input=types.ModelInput.from_ints([1, 2]))])

    lps = [np.array([-1.0, -2.0, -0.5, -3.0, -0.25]), np.array([-0.1, -0.2, -0.3, -0.4, -0.5])]
    output = types.ForwardBackwardOutput(
        loss_fn_output_type="cross_entropy",
        loss_fn_outputs=[{"logprobs": types.TensorData.from_numpy(lp)} for lp in lps],
        metrics={"loss:sum": 0.0},
    )
    custom = compute_custom_loss(_squares, data, output)
    naive = sum(float((lp.astype(np.float32).astype(np.float64) ** 2).sum()) for lp in lps)
    assert custom.loss_sum == pytest.approx(naive) and custom.metrics == {"squares": pytest.approx(naive)}
    bwd = backward_data(data, custom.grads)
    for datum, lp in zip(bwd, lps, strict=True):
        np.testing.assert_allclose(datum.loss_fn_inputs["weights"].to_numpy(), -2.0 * lp, rtol=1e-6)
        assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"
    merged = merge_metrics(output.model_copy(update={"metrics": {"loss:sum": 7.0, "x:mean": 1.0}}), custom)
    assert merged.metrics == {
        "x:mean": 1.0,
        "squares": pytest.approx(naive),
        "loss:sum": pytest.approx(naive),
        "surrogate_loss:sum": 7.0,
    }

    def two_values(_d: Any, lp: list[np.ndarray]) -> Any:
        return 1.0, {}

    def wrong_shape(_d: Any, lp: list[np.ndarray]) -> Any:
        return 1.0, {}, [g[:-1] for g in lp]

    def not_finite(_d: Any, lp: list[np.ndarray]) -> Any:
        return 1.0, {}, [g * np.nan for g in lp]

    def too_few(_d: Any, lp: list[np.ndarray]) -> Any:
        return 1.0, {}, lp[:1]

    for fn, message in (
        (two_values, "returns \\(loss, metrics, grads\\)"),
        (wrong_shape, "has shape"),
        (not_finite, "not finite"),
        (too_few, "1 gradients for 2 datums"),
    ):
        with pytest.raises(ValueError, match=message):
            compute_custom_loss(fn, data, output)


# --------------------------------------------------------------------------- live server


@sqlite_only
def test_checkpoint_calls_match_the_official_sdk(
    loose_server: LiveServer, server_env: ServerEnv, tmp_path: pathlib.Path
) -> None:
    pyrage = pytest.importorskip("pyrage", reason="pyrage is a server dependency")
    url = loose_server.url
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=url, api_key=key)
    rest = ts.RestClient(base_url=url, api_key=key)
    official_service = tinker.ServiceClient(base_url=url, api_key=key)
    official = tinker.RestClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=4, seed=5).result(60)
        run = training.model_id
        training.forward_backward([_datum(TOKENS, weights=[1.0] * 5)], "cross_entropy").result(120)
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result(120)
        state = training.save_state("s1").result(120).path
        sampler_path = training.save_weights_for_sampler("w1").result(120).path
        assert sampler_path is not None

        # -- save_weights_external + get_external_weights_urls: the export is the adapter ----
        saved = training.save_weights_external("exp1").result(120)
        assert isinstance(saved, types.SaveWeightsExternalResponse)
        path = saved.path
        assert path == f"tinker://{run}/external_weights/exp1"
        signed = rest.get_external_weights_urls(path).result(30)
        assert isinstance(signed, types.ExternalWeightsUrlsResponse)
        their_signed = official.get_external_weights_urls(path).result()
        assert set(signed.urls) == set(their_signed.urls) == ADAPTER | {"dp_certificate.json"}
        assert set(signed.urls.values()).isdisjoint(their_signed.urls.values())  # fresh tokens each
        now = _dt.datetime.now(_dt.UTC)
        assert now + _dt.timedelta(minutes=14) < signed.expires <= now + _dt.timedelta(minutes=15, seconds=5)
        ours = _fetch(signed.urls, tmp_path / "ours")
        assert ours == _fetch(their_signed.urls, tmp_path / "theirs")
        # Oracle: the official SDK exports the same state (loaded into a new run) on its own.
        clone = official_service.create_training_client_from_state(state).result()
        clone_path = clone.save_weights_external("clone").result().path
        cloned = _fetch(official.get_external_weights_urls(clone_path).result().urls, tmp_path / "clone")
        exported, reference = (
            _tensors(tmp_path / "ours" / "adapter_model.safetensors"),
            _tensors(tmp_path / "clone" / "adapter_model.safetensors"),
        )
        assert exported.keys() == reference.keys() and exported
        for name, tensor in reference.items():
            np.testing.assert_array_equal(exported[name], tensor)
        assert any(np.any(t != 0) for n, t in exported.items() if "lora_B" in n)  # it trained
        config = json.loads(ours["adapter_config.json"])
        assert config["r"] == 4 and config == json.loads(cloned["adapter_config.json"])

        # ttl_seconds and age recipients, as the server accepts them.
        identity = pyrage.x25519.Identity.generate()
        enc = training.save_weights_external(
            "enc", ttl_seconds=7200, age_encryption_recipients=[str(identity.to_public())]
        ).result(120)
        listed = {c.checkpoint_id: c for c in rest.list_checkpoints(run).result().checkpoints}
        expires_at = listed["external_weights/enc"].expires_at
        assert expires_at is not None
        assert 7100 < (expires_at - _dt.datetime.now(_dt.UTC)).total_seconds() <= 7200
        enc_files = _fetch(asyncio.run(rest.get_external_weights_urls_async(enc.path)).urls, tmp_path / "enc")
        assert set(enc_files) == {f"{n}.age" for n in ADAPTER | {"dp_certificate.json"}}
        for name in ADAPTER:
            assert pyrage.decrypt(enc_files[f"{name}.age"], [identity]) == ours[name]
        with pytest.raises(ts.RequestFailedError, match="age recipient #1") as bad_age:
            training.save_weights_external("bad", age_encryption_recipients=["age1qqqq"]).result(60)
        assert bad_age.value.category == "user"
        with pytest.raises(ts.RequestFailedError, match="already exists"):
            training.save_weights_external("exp1").result(60)
        with pytest.raises(ts.UnprocessableEntityError) as short:  # under 1 hour: refused at submission
            training.save_weights_external("short", ttl_seconds=60)
        assert short.value.status_code == 422

        # -- get_weights_info_by_tinker_path: the official SDK's answer, for every kind ---------
        for p in (state, sampler_path, path):
            info = rest.get_weights_info_by_tinker_path(p).result(30)
            theirs = official.get_weights_info_by_tinker_path(p).result()
            assert (info.base_model, info.is_lora, info.lora_rank) == (TINY_MODEL, True, 4)
            assert (info.base_model, info.is_lora, info.lora_rank, info.train_mlp, info.train_attn) == (
                theirs.base_model,
                theirs.is_lora,
                theirs.lora_rank,
                theirs.train_mlp,
                theirs.train_attn,
            )
        assert asyncio.run(rest.get_weights_info_by_tinker_path_async(state)).lora_rank == 4

        # -- get_sampler ------------------------------------------------------------------
        sampling = service.create_sampling_client(model_path=sampler_path).result(60)
        sampler = rest.get_sampler(sampling.sampling_session_id).result(30)
        assert isinstance(sampler, types.GetSamplerResponse)
        assert (
            sampler.model_dump() == official.get_sampler(sampling.sampling_session_id).result().model_dump()
        )
        assert (sampler.base_model, sampler.model_path) == (TINY_MODEL, sampler_path)
        assert asyncio.run(rest.get_sampler_async(sampler.sampler_id)) == sampler
        with pytest.raises(ts.NotFoundError):
            rest.get_sampler(f"{run.split(':train:')[0]}:sample:99").result(30)

        # -- publish / unpublish (a DP run), as the official SDK sees it ------------------
        assert rest.publish_checkpoint_from_tinker_path(path).result(30) is None
        public = {c.checkpoint_id: c.public for c in official.list_checkpoints(run).result().checkpoints}
        assert public["external_weights/exp1"] is True and public["weights/s1"] is False
        asyncio.run(rest.unpublish_checkpoint_from_tinker_path_async(path))
        public = {c.checkpoint_id: c.public for c in official.list_checkpoints(run).result().checkpoints}
        assert public["external_weights/exp1"] is False

        # -- set_checkpoint_ttl_from_tinker_path --------------------------------------------
        assert rest.set_checkpoint_ttl_from_tinker_path(state, 7200).result(30) is None
        expiry = {c.checkpoint_id: c.expires_at for c in official.list_checkpoints(run).result().checkpoints}
        left = (expiry["weights/s1"] - _dt.datetime.now(_dt.UTC)).total_seconds()
        assert 7100 < left <= 7200
        asyncio.run(rest.set_checkpoint_ttl_from_tinker_path_async(state, None))
        expiry = {c.checkpoint_id: c.expires_at for c in official.list_checkpoints(run).result().checkpoints}
        assert expiry["weights/s1"] is None
        with pytest.raises(ts.BadRequestError, match="ttl_seconds must be between") as ours_err:
            rest.set_checkpoint_ttl_from_tinker_path(state, 60).result(30)
        with pytest.raises(tinker.BadRequestError, match="ttl_seconds must be between") as theirs_err:
            official.set_checkpoint_ttl_from_tinker_path(state, 60).result()
        assert ours_err.value.status_code == theirs_err.value.status_code == 400

        # -- delete: by run and id, and by path; then NotFound everywhere -----------------
        fresh = rest.get_external_weights_urls(path).result(30).urls
        assert rest.delete_checkpoint_from_tinker_path(path).result(30) is None
        assert httpx.get(fresh["adapter_model.safetensors"]).status_code == 404
        with pytest.raises(ts.NotFoundError):
            rest.get_external_weights_urls(path).result(30)
        with pytest.raises(tinker.NotFoundError):
            official.get_external_weights_urls(path).result()
        rest.delete_checkpoint(run, "sampler_weights/w1").result(30)
        asyncio.run(rest.delete_checkpoint_async(run, "external_weights/enc"))
        remaining = {c.checkpoint_id for c in rest.list_checkpoints(run).result(30).checkpoints}
        assert remaining == {"weights/s1"}
        for call in (
            lambda: rest.delete_checkpoint_from_tinker_path(path).result(30),
            lambda: rest.publish_checkpoint_from_tinker_path(path).result(30),
            lambda: rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result(30),
            lambda: rest.get_weights_info_by_tinker_path(path).result(30),
        ):
            with pytest.raises(ts.NotFoundError):
                call()
        with pytest.raises(tinker.NotFoundError):
            official.delete_checkpoint_from_tinker_path(path).result()
    finally:
        rest.close()
        service.close()
        official_service.close("success").result()


@sqlite_only
def test_other_tenants_get_not_found_for_every_checkpoint_call(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    url = loose_server.url
    alice, bob = server_env.tenant_key("alice"), server_env.tenant_key("bob")
    with ts.ServiceClient(base_url=url, api_key=alice) as service:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result(60)
        run = training.model_id
        path = training.save_weights_external("x").result(120).path
        state = training.save_state("s").result(120).path
        sampler_path = training.save_weights_for_sampler("w").result(120).path
        sampler_id = service.create_sampling_client(model_path=sampler_path).result(60).sampling_session_id
        with (
            ts.ServiceClient(base_url=url, api_key=bob) as intruder,
            intruder.create_rest_client() as rest,
        ):
            for call in (
                lambda: rest.get_external_weights_urls(path).result(30),
                lambda: rest.get_weights_info_by_tinker_path(path).result(30),
                lambda: rest.get_weights_info_by_tinker_path(state).result(30),
                lambda: rest.publish_checkpoint_from_tinker_path(path).result(30),
                lambda: rest.unpublish_checkpoint_from_tinker_path(path).result(30),
                lambda: rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result(30),
                lambda: rest.set_checkpoint_ttl_from_tinker_path(state, None).result(30),
                lambda: rest.delete_checkpoint_from_tinker_path(path).result(30),
                lambda: rest.delete_checkpoint(run, "weights/s").result(30),
                lambda: rest.get_sampler(sampler_id).result(30),
                lambda: asyncio.run(rest.delete_checkpoint_from_tinker_path_async(state)),
            ):
                with pytest.raises(ts.NotFoundError) as missing:
                    call()
                assert missing.value.status_code == 404
            stolen = ts.TrainingClient(intruder._holder, run)
            with pytest.raises(ts.NotFoundError):
                stolen.save_weights_external("steal")
            with pytest.raises(ts.NotFoundError):
                stolen.forward_backward_custom([_datum(TOKENS)], _squares)
        # Alice still has everything, unchanged.
        with service.create_rest_client() as own:
            listed = {c.checkpoint_id: c for c in own.list_checkpoints(run).result(30).checkpoints}
            assert set(listed) == {"external_weights/x", "weights/s", "sampler_weights/w"}
            assert all(c.expires_at is None and not c.public for c in listed.values())
            assert own.get_sampler(sampler_id).result(30).model_path == sampler_path


@sqlite_only
@pytest.mark.slow
def test_forward_backward_custom_matches_numpy_and_the_official_sdk(
    loose_server: LiveServer, server_env: ServerEnv
) -> None:
    import torch

    from tensafe.server.models import FutureRow

    url = loose_server.url
    key = server_env.tenant_key("acme")
    service = ts.ServiceClient(base_url=url, api_key=key)
    official_service = tinker.ServiceClient(base_url=url, api_key=key)
    try:
        training = service.create_lora_training_client(base_model=TINY_MODEL, rank=2, seed=3).result(60)
        data = [_datum(TOKENS), _datum(PROBE)]
        forward = training.forward(
            [_datum(TOKENS, weights=[1.0] * 5), _datum(PROBE, weights=[1.0] * 5)], "cross_entropy"
        ).result(120)
        lps = [out["logprobs"].to_numpy().astype(np.float64) for out in forward.loss_fn_outputs]
        naive = sum(float((lp**2).sum()) for lp in lps)

        # Pipelined: optim_step is called before the custom loss has even run.
        fut = training.forward_backward_custom(data, _squares)
        step = training.optim_step(types.AdamParams(learning_rate=1e-2))
        out = fut.result(120)
        assert out.metrics["loss:sum"] == pytest.approx(naive, rel=1e-5)
        assert out.metrics["squares"] == pytest.approx(naive, rel=1e-5)
        # The server's surrogate is sum(-lp * w) with w = -dC/dlp = -2 lp: it equals 2 C.
        assert out.metrics["surrogate_loss:sum"] == pytest.approx(2 * naive, rel=1e-4)
        for record, lp in zip(out.loss_fn_outputs, lps, strict=True):
            np.testing.assert_allclose(record["logprobs"].to_numpy(), lp, rtol=1e-5, atol=1e-6)
        assert step.result(120).metrics is not None

        # The server ran forward (seq 1), forward (2, the custom's), backward (3), optim (4) in order.
        with server_env.sessions() as s:
            rows = list(s.execute(select(FutureRow).where(FutureRow.model_id == training.model_id)).scalars())
        by_seq = {r.seq_id: r for r in rows if r.seq_id}
        assert [by_seq[i].request_type for i in (1, 2, 3, 4)] == [
            "forward",
            "forward",
            "forward_backward",
            "optim_step",
        ]
        assert all(by_seq[i].state == "complete" for i in (1, 2, 3, 4))
        finished, started = by_seq[3].finished_at, by_seq[4].started_at
        assert finished is not None and started is not None and finished <= started
        assert by_seq[3].created_at <= by_seq[4].created_at  # optim_step waited for its turn

        # Oracle: the official SDK's torch custom loss on a fresh run of the same base model
        # (LoRA B starts at zero, so its logprobs are the base model's too).
        official = official_service.create_lora_training_client(
            base_model=TINY_MODEL, rank=2, seed=3
        ).result()

        def torch_squares(
            _d: list[Any], logprobs: list[torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, float]]:
            loss = sum((lp.double() ** 2).sum() for lp in logprobs)
            assert isinstance(loss, torch.Tensor)
            return loss, {"squares": float(loss.detach())}

        theirs = official.forward_backward_custom(
            [_tinker_datum(TOKENS), _tinker_datum(PROBE)], torch_squares
        )
        theirs_out = theirs.result()
        for name in ("loss:sum", "squares", "surrogate_loss:sum"):
            assert out.metrics[name] == pytest.approx(theirs_out.metrics[name], rel=1e-4), name

        # A failing loss: its future raises, and the client refuses further training requests.
        def broken(_d: Any, _lp: Any) -> Any:
            raise ArithmeticError("boom")

        failing = training.forward_backward_custom(data, broken)
        with pytest.raises(ArithmeticError, match="boom"):
            failing.result(120)
        with pytest.raises(ts.RequestFailedError, match="forward_backward_custom failed") as refused:
            training.optim_step(types.AdamParams(learning_rate=1e-2))
        assert refused.value.category == "user"
        with pytest.raises(ts.RequestFailedError):
            training.save_state("after-failure")
        with pytest.raises(ValueError, match="at least one datum"):
            training.forward_backward_custom([], _squares)
        with pytest.raises(ValueError, match="loss_type_input"):
            training.forward_backward_custom(data, _squares, loss_type_input="logits")  # type: ignore[arg-type]

        # A cancelled custom loss never blocks the next request forever: it is refused at once.
        fresh = service.create_lora_training_client(base_model=TINY_MODEL, rank=2).result(60)
        pending = fresh.forward_backward_custom(data, _squares)
        pending.cancel()
        with pytest.raises((concurrent.futures.CancelledError, ts.RequestFailedError)):
            pending.result(120)
        with pytest.raises(ts.RequestFailedError, match="forward_backward_custom failed"):
            fresh.optim_step(types.AdamParams(learning_rate=1e-2))
    finally:
        service.close()
        official_service.close("success").result()
