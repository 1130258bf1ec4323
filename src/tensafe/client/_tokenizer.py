"""Tokenizer loading, deferred: ``transformers`` is imported only when a tokenizer is asked for."""

from __future__ import annotations

from typing import Any

__all__ = ["load_tokenizer"]


def load_tokenizer(tokenizer_id: str) -> Any:
    """Load a Hugging Face tokenizer (imports ``transformers`` now, not at SDK import).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install transformers``).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_id)
