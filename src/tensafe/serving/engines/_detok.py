"""Incremental detokenization and stop strings for one request of the transformers engine.

The text of each new token is the difference between decoding a short window that ends
before it and the same window with it (the window starts a few tokens earlier, in the
prompt for the first tokens, as vLLM does), so leading spaces and multi-byte characters come
out right without decoding the whole output at each step; a window ending in an incomplete
character (``U+FFFD``) waits for the next token. Special tokens are skipped, and a stop
token (EOS or ``stop_token_ids``) adds no text.

Stop strings are searched in the new text and the ``len(stop) - 1`` characters before it (a
stop string may span tokens); the text is cut where the first one starts (the stop string is
not included). While the request runs, the last ``max(len(stop)) - 1`` characters are held
back, so that a prefix of a stop string is never streamed and then retracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Detokenizer"]

#: Prompt tokens that start the decoding window (vLLM's ``INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET``).
_PROMPT_CONTEXT = 5


class Detokenizer:
    """Output text of one request, streamed in deltas (see the module docstring)."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def _advance(self, *, flush: bool) -> int:
        """Append the decodable new text; return its length."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not flush):
            return 0
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self.text += delta
        return len(delta)

    def add(self, token: int) -> bool:
        """Add a generated token; return True when the text now contains a stop string (cut there)."""
        self._ids.append(token)
        added = self._advance(flush=False)
        return added > 0 and self._check_stop(added)

    def finish(self) -> None:
        """Flush the text still waiting for the rest of a character (the request ended)."""
        if not self.stopped and self._read < len(self._ids):
            added = self._advance(flush=True)
            if added:
                self._check_stop(added)

    def _check_stop(self, added: int) -> bool:
        if not self._stop:
            return False
        found = -1
        for stop in self._stop:
            start = max(0, len(self.text) - added - len(stop) + 1)
            at = self.text.find(stop, start)
            if at != -1 and (found == -1 or at < found):
                found = at
        if found == -1:
            return False
        self.text = self.text[:found]
        self.stopped = True
        return True

    def delta(self, *, finished: bool) -> str:
        """The text not sent yet (all of it once finished, else minus the held-back tail)."""
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._holdback)
        out = self.text[self._sent : end]
        self._sent = end
        return out
