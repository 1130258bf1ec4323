"""Keep Python's cyclic garbage collector off the long-lived objects of a loaded model.

A loaded base model with its tokenizer and PEFT wrappers is hundreds of thousands of
Python objects. Every training step allocates many short-lived ones, so CPython's
collector regularly runs a full (oldest-generation) collection that walks all of them:
about 0.3 s per collection for SmolLM2-135M on the CI machine class, every few steps.
:func:`settle_heap` collects once and then moves every object that exists at that moment
into the collector's permanent generation (:func:`gc.freeze`): they stay alive while
referenced and are freed by reference counting as usual, but are no longer traversed.
Call it after loading a model, in the process that owns the training loop.

Calling it again (after a model was closed and another loaded) first unfreezes, so the
objects of the closed model are collected once before the new set is frozen.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["settle_heap"]

_lock = threading.Lock()


def settle_heap() -> None:
    """Collect garbage once, then exclude every surviving object from later collections."""
    with _lock:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
