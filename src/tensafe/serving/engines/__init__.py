"""Inference engines behind :class:`tensafe.serving.engine.Engine`.

* :mod:`.transformers`: :class:`~tensafe.serving.engines.transformers.TransformersEngine`, in
  process on Hugging Face ``transformers`` (CPU): continuous batching, per-row multi-LoRA, a
  left-padded KV cache, cancellation, vLLM's sampling semantics. The default engine.
* :mod:`.vllm`: :class:`~tensafe.serving.engines.vllm.VllmEngine`, the real vLLM engine in a
  worker process of its own environment (see ``docs/serving.md``).

Engines import ``torch``; import the engine module you use (nothing heavy is imported here).
"""

from __future__ import annotations

__all__: list[str] = []
