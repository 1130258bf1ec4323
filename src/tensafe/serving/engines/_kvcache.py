"""The batch KV cache of the transformers engine: one left-padded buffer per layer.

Every running sequence owns one row of the batch. All rows share the column axis (the model
writes the new token of every row into the same column), so a row whose sequence is shorter
than the longest one starts with ``pad`` columns of zeros that the attention mask hides. Each
layer keeps its keys and values in a buffer with spare capacity, so a decode step writes one
column in place instead of concatenating the whole cache (what ``DynamicLayer`` does).

Rows come and go between steps:

* :meth:`BatchKVCache.admit` appends the rows of newly prefilled sequences (their own cache,
  computed alone or with prompts of the same length, so with no padding and nothing to mask),
  left-padding whichever side is shorter;
* :meth:`BatchKVCache.keep` drops the rows of finished or cancelled sequences and then the
  leading columns that every remaining row pads.

The padded columns are zeros, never the output of a padding token, so a masked column
contributes exactly nothing (no ``0 * NaN``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["BatchKVCache"]

_GROWTH = 64


class _BufferLayer(DynamicLayer):  # type: ignore[misc,no-untyped-call]
    """A full-attention layer cache over a buffer ``[batch, heads, capacity, head_dim]``."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.buf_k: torch.Tensor | None = None
        self.buf_v: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def set(self, keys: torch.Tensor, values: torch.Tensor, *, spare: int = _GROWTH) -> None:
        """Replace the contents with ``keys``/``values`` (``[batch, heads, length, dim]``)."""
        b, h, n, d = keys.shape
        self.buf_k = keys.new_zeros((b, h, n + spare, d))
        self.buf_v = values.new_zeros((b, h, n + spare, d))
        self.buf_k[:, :, :n] = keys
        self.buf_v[:, :, :n] = values
        self.length = n
        self.keys = self.buf_k[:, :, :n]
        self.values = self.buf_v[:, :, :n]
        self.device = keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = key_states.shape[-2]
        if self.buf_k is None or self.buf_v is None:
            self.set(key_states, value_states)
        else:
            if self.length + q > self.buf_k.shape[-2]:
                self.set(self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length], spare=q + _GROWTH)
                assert self.buf_k is not None and self.buf_v is not None
            self.buf_k[:, :, self.length : self.length + q] = key_states
            self.buf_v[:, :, self.length : self.length + q] = value_states
            self.length += q
        assert self.buf_k is not None and self.buf_v is not None
        self.keys = self.buf_k[:, :, : self.length]
        self.values = self.buf_v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def _layers(cache: Cache) -> list[_BufferLayer]:
    layers = [layer for layer in cache.layers if isinstance(layer, _BufferLayer)]
    if len(layers) != len(cache.layers):
        raise RuntimeError("the cache was not made by BatchKVCache.fresh")
    return layers


class BatchKVCache:
    """The left-padded KV cache of the running batch (see the module docstring).

    ``pads[i]`` is the number of leading padding columns of row ``i``; ``length`` the number of
    columns. :meth:`cache` is what the model's ``forward`` receives as ``cache``.
    """

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self.pads: list[int] = []
        self._cache: Cache | None = None

    @staticmethod
    def fresh(num_layers: int) -> Cache:
        """An empty cache for a prefill forward (rows of the same, unpadded length)."""
        return Cache(layers=[_BufferLayer() for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        return len(self.pads)

    @property
    def length(self) -> int:
        if self._cache is None:
            return 0
        return _layers(self._cache)[0].length

    def cache(self) -> Cache:
        if self._cache is None:
            raise RuntimeError("the batch cache is empty")
        return self._cache

    def attention_mask(self, extra: int) -> torch.Tensor:
        """``[rows, length + extra]``: 1 on real columns (and the ``extra`` new ones), 0 on padding."""
        columns = torch.arange(self.length + extra)
        pads = torch.tensor(self.pads, dtype=torch.long).unsqueeze(1)
        return (columns.unsqueeze(0) >= pads).to(torch.long)

    def positions(self) -> torch.Tensor:
        """``[rows, 1]``: the position of the next token of each row (its number of real tokens)."""
        return torch.tensor([[self.length - pad] for pad in self.pads], dtype=torch.long)

    def admit(self, prefilled: Cache, count: int) -> None:
        """Append ``count`` rows whose unpadded cache is ``prefilled`` (all rows of the same length)."""
        new_layers = _layers(prefilled)
        n_new = new_layers[0].length
        if self._cache is None or not self.pads:
            self._cache = prefilled
            self.pads = [0] * count
            return
        n_old = self.length
        width = max(n_old, n_new)
        old_layers = _layers(self._cache)
        for old, new in zip(old_layers, new_layers, strict=True):
            assert old.buf_k is not None and old.buf_v is not None
            assert new.buf_k is not None and new.buf_v is not None
            b_old, h, _, d = old.buf_k.shape
            keys = old.buf_k.new_zeros((b_old + count, h, width, d))
            values = old.buf_v.new_zeros((b_old + count, h, width, d))
            keys[:b_old, :, width - n_old :] = old.buf_k[:, :, :n_old]
            values[:b_old, :, width - n_old :] = old.buf_v[:, :, :n_old]
            keys[b_old:, :, width - n_new :] = new.buf_k[:, :, :n_new]
            values[b_old:, :, width - n_new :] = new.buf_v[:, :, :n_new]
            old.set(keys, values)
        self.pads = [pad + width - n_old for pad in self.pads] + [width - n_new] * count

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the columns every remaining row pads."""
        if self._cache is None:
            return
        if not rows:
            self._cache = None
            self.pads = []
            return
        pads = [self.pads[i] for i in rows]
        trim = min(pads)
        if rows == list(range(len(self.pads))) and trim == 0:
            return
        index = torch.tensor(rows, dtype=torch.long)
        for layer in _layers(self._cache):
            assert layer.buf_k is not None and layer.buf_v is not None
            n = layer.length
            layer.set(
                layer.buf_k[:, :, trim:n].index_select(0, index),
                layer.buf_v[:, :, trim:n].index_select(0, index),
            )
        self.pads = [pad - trim for pad in pads]
