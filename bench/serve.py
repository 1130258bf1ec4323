"""Serving throughput and latency: the TenSafe engine vs a sequential ``generate()`` loop.

One run, one model (default SmolLM2-135M-Instruct), the same prompts and the same LoRA adapter
(rank 8 on the attention and MLP projections, random non-zero weights, built with ``peft`` in
memory) everywhere. Every request is greedy, ignores EOS and generates exactly
``--max-tokens`` tokens, so every side produces the same number of tokens.

1. **Engine** (``--engine transformers``, default; ``--engine vllm`` once that engine exists):
   ``--requests`` requests through :meth:`Engine.generate`, ``c`` of them in flight at a time
   (closed loop: ``c`` clients, each sending its next request when the previous one ended), for
   each ``c`` of ``--concurrency`` (default 1, 4, 16). Per ``c``: output tokens/s (all tokens /
   wall time), time to first token p50/p95, inter-token latency p50/p95 (gaps between the
   tokens of one request).
2. **Baseline**: in the same process, a sequential loop of ``PeftModel.generate()`` (plain
   transformers + PEFT, KV cache, greedy) over the same prompts with the same adapter; its
   tokens/s and the ratio engine / baseline at the largest concurrency (goal >= 3x at 16).
3. **Mixed adapters**: at the largest concurrency, each request for one of 8 different
   adapters (round robin) vs every request for the same adapter; the ratio of their tokens/s
   (goal >= 0.8x).
4. **vLLM's own OpenAI server** (``--vllm-server-url URL``): :func:`measure_openai_server`
   streams the same requests (token-id prompts) to ``/v1/completions`` of any
   OpenAI-compatible server and measures it the same way, to compare TenSafe on the vLLM
   engine with vLLM serving the same adapter itself. Starting vLLM's server is the caller's
   job (see ``docs/benchmarks.md``).

The machine may be shared: the engine and the baseline run in the same process, one after
the other, and the ratios are what the goals are about. The last printed line is one JSON
object with every figure.

Usage: ``python bench/serve.py [--model NAME] [--requests 16] [--max-tokens 64]
[--concurrency 1,4,16] [--rank 8] [--engine transformers|vllm] [--no-baseline] [--no-mixed]
[--vllm-server-url URL --vllm-server-model NAME]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOPICS = (
    "the history of the printing press",
    "how a heat pump works",
    "the rules of chess for a beginner",
    "why the sky is blue",
    "the water cycle",
    "how vaccines train the immune system",
    "the basics of double-entry bookkeeping",
    "what a compiler does",
    "the life cycle of a star",
    "how to bake sourdough bread",
    "the causes of the French Revolution",
    "how public-key cryptography works",
    "the migration of monarch butterflies",
    "what differential privacy protects",
    "how a bill becomes a law",
    "the structure of DNA",
)
_ids = itertools.count()


# --------------------------------------------------------------------------- inputs


def make_adapter(model_dir: str, *, rank: int, seed: int, adapter_id: str, base_model_id: str) -> Any:
    """A random, non-zero PEFT LoRA adapter for ``model_dir`` as an in-memory ``LoraAdapter``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tensafe.serving.engine import LoraAdapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_id
    with tempfile.TemporaryDirectory(prefix="tensafe-bench-adapter-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        files = {
            name: (Path(tmp) / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }
    return LoraAdapter(adapter_id=adapter_id, base_model_id=base_model_id, files=files)


def make_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` chat prompts (the model's template), cycling over :data:`TOPICS`."""
    prompts = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} in a few paragraphs."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts.append([int(t) for t in ids])
    return prompts


# --------------------------------------------------------------------------- measurements


@dataclass
class RequestTiming:
    """One request: when it was sent, when each token arrived."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(timings: Sequence[RequestTiming], wall: float) -> dict[str, float]:
    """tokens/s, TTFT and inter-token latency percentiles (milliseconds)."""
    gaps = [g for t in timings for g in t.gaps]
    ttfts = [t.ttft for t in timings]
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(1000 * _pct(ttfts, 0.5), 1),
        "ttft_p95_ms": round(1000 * _pct(ttfts, 0.95), 1),
        "itl_p50_ms": round(1000 * _pct(gaps, 0.5), 2),
        "itl_p95_ms": round(1000 * _pct(gaps, 0.95), 2),
    }


async def _closed_loop(concurrency: int, jobs: Sequence[Any], one: Any) -> tuple[list[RequestTiming], float]:
    queue = list(jobs)
    timings: list[RequestTiming] = []

    async def client() -> None:
        while queue:
            job = queue.pop(0)
            timings.append(await one(job))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings, time.perf_counter() - start


async def measure_engine(
    engine: Any,
    prompts: Sequence[list[int]],
    adapters: Sequence[str | None],
    *,
    concurrency: int,
    max_tokens: int,
) -> dict[str, float]:
    """Run every prompt through ``engine`` with ``concurrency`` requests in flight (adapters round robin)."""
    from tensafe.serving.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(job: tuple[list[int], str | None]) -> RequestTiming:
        prompt, adapter = job
        request = GenerationRequest(
            request_id=f"bench-{next(_ids)}", prompt_token_ids=prompt, params=params, adapter_id=adapter
        )
        timing = RequestTiming(sent=time.perf_counter())
        async for chunk in engine.generate(request):
            now = time.perf_counter()
            for _ in chunk.token_ids:
                timing.arrivals.append(now)
            timing.tokens += len(chunk.token_ids)
        return timing

    jobs = [(p, adapters[i % len(adapters)]) for i, p in enumerate(prompts)]
    timings, wall = await _closed_loop(concurrency, jobs, one)
    if any(t.tokens != max_tokens for t in timings):
        raise SystemExit("a request ended before max_tokens: the measurement would not be comparable")
    return summarize(timings, wall)


async def measure_openai_server(
    base_url: str, model: str, prompts: Sequence[list[int]], *, concurrency: int, max_tokens: int
) -> dict[str, float]:
    """The same measurement against ``POST {base_url}/v1/completions`` of an OpenAI-compatible server.

    Streams each request (token-id prompt, greedy, ``ignore_eos``: vLLM's extension) and times
    every token of every SSE chunk; ``usage`` (``stream_options.include_usage``) gives the
    token counts. Used for vLLM's own OpenAI server with the adapter served under ``model``.
    """
    import httpx

    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=600) as client:

        async def one(prompt: list[int]) -> RequestTiming:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            timing = RequestTiming(sent=time.perf_counter())
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if event.get("choices"):
                        timing.arrivals.append(time.perf_counter())
                    if event.get("usage"):
                        timing.tokens = int(event["usage"]["completion_tokens"])
            return timing

        timings, wall = await _closed_loop(concurrency, prompts, one)
    return summarize(timings, wall)


def measure_generate_loop(
    model_dir: str, adapter: Any, prompts: Sequence[list[int]], *, max_tokens: int
) -> dict[str, float]:
    """The baseline: ``PeftModel.generate()`` over the prompts one after the other (greedy, KV cache)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="tensafe-bench-baseline-") as tmp:
        for name, data in adapter.files.items():
            (Path(tmp) / name).write_bytes(data)
        model = PeftModel.from_pretrained(base, tmp).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            tokens += int(out.shape[1]) - len(prompt)
    wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
    }


# --------------------------------------------------------------------------- engines


async def start_engine(
    kind: str, model: str, *, max_num_seqs: int, max_lora_rank: int, args: argparse.Namespace
) -> Any:
    """Start the engine under test (the hook for ``--engine vllm``)."""
    if kind == "transformers":
        from tensafe.serving.engines.transformers import TransformersEngine

        return await TransformersEngine.start(
            model, max_loras=8, max_lora_rank=max_lora_rank, max_num_seqs=max_num_seqs, max_model_len=None
        )
    if kind == "vllm":
        try:
            from tensafe.serving.engines.vllm import VllmEngine  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise SystemExit(
                "bench/serve.py: the vllm engine (tensafe.serving.engines.vllm) is not available"
            ) from None
        return await VllmEngine.start(
            model,
            max_loras=8,
            max_lora_rank=max_lora_rank,
            max_num_seqs=max_num_seqs,
            max_model_len=None,
            vllm_python=args.vllm_python,
        )
    raise SystemExit(f"bench/serve.py: unknown engine {kind!r} (transformers or vllm)")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from tensafe.training.models import resolve_model

    spec = resolve_model(args.model)
    model_dir = str(spec.path)
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    top = max(levels)
    engine = await start_engine(args.engine, args.model, max_num_seqs=top, max_lora_rank=args.rank, args=args)
    figures: dict[str, Any] = {
        "model": spec.id,
        "engine": args.engine,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "lora_rank": args.rank,
        "torch_threads": __import__("torch").get_num_threads(),
        "cpus": os.cpu_count(),
    }
    try:
        prompts = make_prompts(engine.tokenizer(), args.requests)
        figures["prompt_tokens_mean"] = round(statistics.mean(len(p) for p in prompts), 1)
        n_adapters = 8 if not args.no_mixed else 1
        adapters = [
            make_adapter(
                model_dir, rank=args.rank, seed=i, adapter_id=f"bench-{i}", base_model_id=engine.model_id
            )
            for i in range(n_adapters)
        ]
        for adapter in adapters:
            await engine.load_adapter(adapter)
        # Warm-up (first forward passes allocate): a few tokens at the top concurrency.
        await measure_engine(engine, prompts[:top], ["bench-0"], concurrency=top, max_tokens=4)
        figures["engine"] = args.engine
        figures["by_concurrency"] = {}
        for c in levels:
            figures["by_concurrency"][str(c)] = await measure_engine(
                engine, prompts, ["bench-0"], concurrency=c, max_tokens=args.max_tokens
            )
            print(f"engine c={c}: {json.dumps(figures['by_concurrency'][str(c)])}", flush=True)
        if not args.no_mixed:
            mixed = await measure_engine(
                engine, prompts, [a.adapter_id for a in adapters], concurrency=top, max_tokens=args.max_tokens
            )
            one = figures["by_concurrency"][str(top)]
            figures["mixed_8_adapters"] = mixed
            figures["mixed_over_one_adapter"] = round(
                mixed["output_tokens_per_s"] / one["output_tokens_per_s"], 3
            )
            print(f"engine c={top}, 8 adapters: {json.dumps(mixed)}", flush=True)
    finally:
        await engine.close()
    if not args.no_baseline:
        baseline = measure_generate_loop(model_dir, adapters[0], prompts, max_tokens=args.max_tokens)
        figures["baseline_sequential_generate"] = baseline
        best = figures["by_concurrency"][str(top)]["output_tokens_per_s"]
        figures[f"engine_c{top}_over_baseline"] = round(best / baseline["output_tokens_per_s"], 3)
        print(f"baseline generate() loop: {json.dumps(baseline)}", flush=True)
    if args.vllm_server_url:
        figures["vllm_server"] = {}
        for c in levels:
            figures["vllm_server"][str(c)] = await measure_openai_server(
                args.vllm_server_url,
                args.vllm_server_model,
                prompts,
                concurrency=c,
                max_tokens=args.max_tokens,
            )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"registered name or model directory (default {DEFAULT_MODEL})"
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per measurement (default 16)")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens generated per request (default 64)"
    )
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default 1,4,16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters (default 8)")
    parser.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--vllm-python", default=None, help="python of the vLLM environment (--engine vllm)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the sequential generate() loop")
    parser.add_argument("--no-mixed", action="store_true", help="skip the 8-adapter run")
    parser.add_argument("--vllm-server-url", default=None, help="also measure this OpenAI-compatible server")
    parser.add_argument(
        "--vllm-server-model", default="bench-0", help="model name of the adapter on that server"
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_tokens < 1 or args.rank < 1:
        parser.error("--requests, --max-tokens and --rank must be >= 1")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency must be comma-separated integers")
    if not levels or min(levels) < 1:
        parser.error("--concurrency levels must be >= 1")
    figures = asyncio.run(run(args))
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
