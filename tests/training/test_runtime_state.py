"""Session state serialization: exact round trip, optimizer state, Poisson data set, bad blobs."""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.privacy import DpPolicy, DpPolicyError
from tensafe.training.runtime import (
    STATE_FORMAT,
    AdamParams,
    Datum,
    LoraTrainingSession,
    StateFormatError,
)

ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01)


def _policy(**overrides: Any) -> DpPolicy:
    values: dict[str, Any] = {
        "target_epsilon": 50.0,
        "delta": 1e-5,
        "clip_norm": 0.5,
        "noise_multiplier": 1.0,
        "dataset_size": 1000,
        "expected_batch_size": 4,
    }
    values.update(overrides)
    return DpPolicy(**values)


def _data(n: int, seed: int = 0) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tokens = [int(x) for x in rng.integers(1, 300, size=3 + i % 3)]
        targets = np.array([*tokens[1:], 2], dtype=np.int64)
        out.append(Datum(tokens, {"target_tokens": targets, "weights": np.ones(len(tokens), np.float32)}))
    return out


def _weights(s: LoraTrainingSession) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}


def _step(s: LoraTrainingSession, data: list[Datum]) -> dict[str, float]:
    s.forward_backward(data, "cross_entropy")
    return s.optim_step(ADAM)


def _header(blob: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert meta["format"] == STATE_FORMAT and meta["version"] == "1"
    return json.loads(meta["header"])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def trained(tiny_model_dir: pathlib.Path) -> tuple[LoraTrainingSession, bytes]:
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=_policy(), seed=7, deterministic=True
    )
    for k in range(2):
        _step(s, _data(4, seed=k))
    return s, s.state_bytes(include_optimizer=True)


def test_round_trip_is_bitwise_and_the_next_step_is_identical(
    tiny_model_dir: pathlib.Path, trained: tuple[LoraTrainingSession, bytes]
) -> None:
    original, blob = trained
    header = _header(blob)
    assert header["base_model"]["revision"] == original.base_model_revision
    assert header["step"] == 2 and header["dp"]["setup"]["budget"]["steps"] == 2
    restored = LoraTrainingSession.from_state_bytes(blob, deterministic=True)
    w0, w1 = _weights(original), _weights(restored)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert restored.step == 2 and restored.privacy_spent() == original.privacy_spent()
    # Continue both with the same data: deterministic noise + same optimizer moments.
    original_copy = LoraTrainingSession.from_state_bytes(blob, deterministic=True)
    m_a = _step(original_copy, _data(3, seed=9))
    m_b = _step(restored, _data(3, seed=9))
    assert m_a == m_b
    wa, wb = _weights(original_copy), _weights(restored)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ... and equal to what the never-serialised session does next.
    _step(original, _data(3, seed=9))
    wo = _weights(original)
    assert all(torch.equal(wo[k], wa[k]) for k in wo)
    assert original.privacy_certificate().epsilon == restored.privacy_certificate().epsilon


def test_optimizer_state_matters(trained: tuple[LoraTrainingSession, bytes]) -> None:
    _, blob = trained
    with_opt = LoraTrainingSession.from_state_bytes(blob, deterministic=True)
    without = LoraTrainingSession.from_state_bytes(blob, deterministic=True, restore_optimizer=False)
    _step(with_opt, _data(2, seed=1))
    _step(without, _data(2, seed=1))
    a, b = _weights(with_opt), _weights(without)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_weights_only_state(trained: tuple[LoraTrainingSession, bytes]) -> None:
    original, _ = trained
    blob = original.state_bytes(include_optimizer=False)
    assert _header(blob)["optimizer"] is None
    with pytest.raises(StateFormatError, match="without optimizer state"):
        LoraTrainingSession.from_state_bytes(blob)
    restored = LoraTrainingSession.from_state_bytes(blob, restore_optimizer=False)
    a, b = _weights(original), _weights(restored)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_policy_and_mode_checks_on_load(trained: tuple[LoraTrainingSession, bytes]) -> None:
    _, blob = trained
    with pytest.raises(DpPolicyError, match="another DP policy"):
        LoraTrainingSession.from_state_bytes(blob, policy=_policy(target_epsilon=1.0))
    assert LoraTrainingSession.from_state_bytes(blob, policy=_policy()).policy == _policy()
    secure = LoraTrainingSession.from_state_bytes(blob)  # secure noise from here on
    assert secure.privacy_certificate().noise_rng == "csprng"


def test_non_private_secure_state_has_no_seed(tiny_model_dir: pathlib.Path) -> None:
    s = LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=_policy(), seed=5)
    _step(s, _data(2))
    blob = s.state_bytes(include_optimizer=True)
    assert _header(blob)["noise_seed"] is None  # a secure run has no noise seed in its state
    with pytest.raises(StateFormatError, match="deterministic"):
        LoraTrainingSession.from_state_bytes(blob, deterministic=True)
    n = LoraTrainingSession.create(base_model=str(tiny_model_dir), rank=2, dp=None, allow_non_private=True)
    _step(n, _data(2))
    m = LoraTrainingSession.from_state_bytes(n.state_bytes(include_optimizer=True))
    assert m.policy is None and m.step == 1


def test_server_poisson_state_keeps_the_data_set(tiny_model_dir: pathlib.Path) -> None:
    policy = _policy(sampling="server_poisson", dataset_size=None, expected_batch_size=3)
    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=2, dp=policy, seed=1, deterministic=True
    )
    examples = _data(10, seed=3)
    examples[0] = Datum(
        examples[0].model_input, {"target_tokens": examples[0].loss_fn_inputs["target_tokens"]}
    )
    s.register_dataset(examples)
    b = s.sample_batch()
    if b:
        s.forward_backward(b, "cross_entropy")
    s.optim_step(ADAM)
    blob = s.state_bytes(include_optimizer=True)
    r = LoraTrainingSession.from_state_bytes(blob, deterministic=True)
    assert r.privacy_spent() == s.privacy_spent()
    nb_s, nb_r = s.sample_batch(), r.sample_batch()
    assert [d.model_input for d in nb_s] == [d.model_input for d in nb_r]
    for x, y in zip(nb_s, nb_r, strict=True):
        assert x.loss_fn_inputs.keys() == y.loss_fn_inputs.keys()
        for k in x.loss_fn_inputs:
            np.testing.assert_array_equal(x.loss_fn_inputs[k], y.loss_fn_inputs[k])
    if nb_r:
        r.forward_backward(nb_r, "cross_entropy")  # the restored data set is accepted as the drawn batch
    r.optim_step(ADAM)


def test_sampler_weights_are_peft_files(trained: tuple[LoraTrainingSession, bytes]) -> None:
    original, _ = trained
    files = original.sampler_weights_files()
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads(files["adapter_config.json"])
    assert config["r"] == 4 and config["base_model_name_or_path"] == original.base_model_id
    from safetensors.torch import load

    tensors = load(files["adapter_model.safetensors"])
    assert len(tensors) == len(_weights(original))


def test_wrong_base_model_is_refused(
    tmp_path: pathlib.Path,
    tiny_llama_factory: Any,
    tiny_tokenizer: Any,
    trained: tuple[LoraTrainingSession, bytes],
) -> None:
    _, blob = trained
    other = tmp_path / "other"
    tiny_llama_factory(seed=1).save_pretrained(str(other), safe_serialization=True)
    tiny_tokenizer.save_pretrained(str(other))
    with pytest.raises(StateFormatError, match="differ"):
        LoraTrainingSession.from_state_bytes(blob, base_model=str(other))


def test_unknown_version_and_format_are_refused(trained: tuple[LoraTrainingSession, bytes]) -> None:
    from safetensors.torch import save

    _, blob = trained
    for meta in ({"format": STATE_FORMAT, "version": "2", "header": "{}"}, {"format": "other"}):
        bad = bytes(save({"x": torch.zeros(1)}, metadata=meta))
        with pytest.raises(StateFormatError):
            LoraTrainingSession.from_state_bytes(bad)
    with pytest.raises(StateFormatError):
        LoraTrainingSession.from_state_bytes(blob[:-10])
    with pytest.raises(StateFormatError):
        LoraTrainingSession.from_state_bytes(b"")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_state_fails_with_state_format_error_only(
    trained: tuple[LoraTrainingSession, bytes], data: st.DataObject
) -> None:
    _, blob = trained
    (n,) = struct.unpack("<Q", blob[:8])
    # Mutate the header region (where parsing decisions happen) or truncate.
    pos = data.draw(st.integers(0, 8 + n - 1))
    value = data.draw(st.integers(0, 255))
    mutated = blob[:pos] + bytes([value]) + blob[pos + 1 :]
    if mutated == blob:
        return
    try:
        LoraTrainingSession.from_state_bytes(mutated, restore_optimizer=False)
    except (StateFormatError, DpPolicyError):
        pass


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=0, max_size=6),
    dtype_idx=st.lists(st.integers(0, len(_DTYPES) - 1), min_size=6, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_encoder_matches_the_safetensors_library(
    shapes: list[list[int]], dtype_idx: list[int], seed: int
) -> None:
    """Our safetensors writer vs the library: same tensors on load, same digest, readable by both."""
    from safetensors.torch import load, save

    from tensafe.training.runtime.state import _digest, decode_state, encode_state

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        dtype = _DTYPES[dtype_idx[i]]
        t = torch.randint(0, 200, shape, generator=gen).to(dtype)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        tensors[f"t/{i}"] = t if i % 2 == 0 else t.t() if t.dim() == 2 else t  # non-contiguous views too
    header = {"step": 3, "name": "x"}
    ours = encode_state(header, tensors)
    loaded = load(ours)  # the independent reader
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(
            loaded[name].contiguous().reshape(-1).view(torch.uint8),
            t.contiguous().reshape(-1).view(torch.uint8),
        )
    got_header, got = decode_state(ours)
    assert got_header == header and set(got) == set(tensors)
    # The same state written by safetensors' own writer decodes to the same tensors and digest.
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    meta = {
        "format": STATE_FORMAT,
        "version": "1",
        "digest": _digest(header_json, tensors),
        "header": header_json,
    }
    reference = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    (n,) = struct.unpack("<Q", ours[:8])
    assert json.loads(ours[8 : 8 + n])["__metadata__"] == meta
    # The digest as the format's docstring defines it, computed naively.
    naive = hashlib.sha256(b"tensafe-lora-session/v1\0" + header_json.encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        naive.update(f"{name}\0{dtype}\0{json.dumps(list(t.shape))}\0".encode())
        naive.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() + b"\0")
    assert meta["digest"] == naive.hexdigest()
    assert decode_state(bytes(reference))[0] == header


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=64), min_size=0, max_size=6),
    reads=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20),
)
def test_segment_reader_returns_the_joined_bytes_for_any_read_sizes(
    sizes: list[int], reads: list[int]
) -> None:
    """EncodedState.reader() over segments == the concatenation, whatever the read sizes."""
    from tensafe.training.runtime.state import EncodedState

    segments = [bytes((i * 7 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]
    joined = b"".join(segments)
    blob = EncodedState([*segments[:1], *(memoryview(s) for s in segments[1:])])
    assert blob.nbytes == len(joined) and blob.tobytes() == joined
    reader, got = blob.reader(), bytearray()
    for k in reads * (len(joined) // max(1, sum(reads)) + 2):
        buf = bytearray(k)
        n = reader.readinto(buf)
        got += buf[:n]
        if n == 0:
            break
    assert bytes(got) == joined
    assert reader.readinto(bytearray(8)) == 0 and blob.reader().read() == joined


def test_live_snapshot_encodes_to_state_bytes_and_survives_a_forward_backward(
    tiny_model_dir: pathlib.Path,
) -> None:
    """snapshot() (no copies) serializes to exactly state_bytes(), also after a forward_backward
    ran in between (the server writes it while the next forward_backward executes), and its
    step counters are frozen against the next optim_step."""
    from tensafe.training.runtime.state import encode_snapshot_parts

    s = LoraTrainingSession.create(
        base_model=str(tiny_model_dir), rank=4, dp=_policy(), seed=3, deterministic=True
    )
    _step(s, _data(4, seed=1))
    expected = s.state_bytes(include_optimizer=True)
    snap = s.snapshot(include_optimizer=True)
    s.forward_backward(_data(4, seed=2), "cross_entropy")
    assert encode_snapshot_parts(snap).tobytes() == expected
    assert encode_snapshot_parts(snap).reader().read() == expected
    s.optim_step(ADAM)  # changes weights, moments and the step counters in place
    assert s.state_bytes(include_optimizer=True) != expected
    assert all(int(step) == 1 for _, _, step in snap.optimizer.moments.values())  # type: ignore[union-attr]
