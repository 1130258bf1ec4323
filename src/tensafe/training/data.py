"""Fine-tuning datasets: JSONL loading, chat-template rendering, label masking and batching.

Two JSONL record forms are accepted, one JSON object per line (blank lines are skipped):

* prompt/completion: ``{"prompt": "...", "completion": "..."}``, rendered as a user turn
  followed by an assistant turn;
* chat messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  with at least one assistant turn.

Other top-level keys (``"id"``, ``"meta"``, ...) are ignored. Every record is rendered with the
tokenizer's chat template, and the loss is computed only on assistant tokens: the assistant's
content and the template's end-of-turn token (a token that straddles the start of a turn, such
as a newline merged with the first byte of the content, counts as assistant). Every other
position (system and user turns, template markup, padding) has label ``-100``. Sequences are
truncated to ``max_length`` tokens from the right; an example with no supervised token left is
dropped (and counted in the log).

Errors never quote record contents: a malformed line is reported by file and line number.

Dataset commitment. Training evidence names its data set by a *keyed* commitment,
``HMAC-SHA256(key, "tensafe/dataset-commitment/v2" || 0x00 || c_1 || "\\n" || ... || c_n ||
"\\n")`` over the canonical JSON of each record (:func:`records_commitment`, scheme
:data:`COMMITMENT_SCHEME`). The 32-byte key is random per run and stays with the data owner
(:func:`write_commitment_key`, mode 0600): without it, nobody can test a guess about the data
(which of two diagnoses a record holds) against the commitment, as anyone could with a plain
hash. :func:`records_sha256` is that plain, unkeyed hash; it identifies a file for its owner
(``tensafe data check``, the canary file) and must never be published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tensafe._fsutil import atomic_write_bytes
from tensafe.crypto.mac import KeyedDigest
from tensafe.training.errors import DataError, EmptyDatasetError, TrainingConfigError, TrainingError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "COMMITMENT_KEY_BYTES",
    "COMMITMENT_KEY_FILENAME",
    "COMMITMENT_KEY_FORMAT",
    "COMMITMENT_SCHEME",
    "IGNORE_INDEX",
    "Batch",
    "CommitmentMismatchError",
    "TokenizedExample",
    "collate",
    "dataset_commitment",
    "dataset_sha256",
    "load_jsonl",
    "new_commitment_key",
    "read_commitment_key",
    "records_commitment",
    "records_sha256",
    "to_messages",
    "tokenize_examples",
    "train_eval_split",
    "verify_records_commitment",
    "write_commitment_key",
]

_log = logging.getLogger(__name__)

#: Label value ignored by the loss (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100

_ROLES = frozenset({"system", "user", "assistant"})
#: The keyed commitment scheme that training evidence records (``{"scheme": ..., "value": ...}``).
COMMITMENT_SCHEME = "hmac-sha256/v2"
_COMMITMENT_LABEL = b"tensafe/dataset-commitment/v2"
#: Format identifier of a commitment key file.
COMMITMENT_KEY_FORMAT = "tensafe.dataset-commitment-key/v1"
#: File name of the key in a run's ``output_dir`` (never inside ``adapter/``).
COMMITMENT_KEY_FILENAME = "dataset_commitment.key"
#: Length of a commitment key in bytes.
COMMITMENT_KEY_BYTES = 32
_MAX_KEY_FILE_BYTES = 4096
#: Label of the plain digest; it kept the v1 commitment's label, so old values still compare.
_SHA256_LABEL = b"tensafe/dataset-commitment/v1\n"
_SPLIT_LABEL = b"tensafe/train-eval-split/v1\n"

T = TypeVar("T")


# --------------------------------------------------------------------------- loading + validation


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def to_messages(record: Mapping[str, Any], *, where: str = "record") -> list[dict[str, str]]:
    """Validate one record and return it as a list of chat messages.

    Args:
        record: A prompt/completion or chat-messages record.
        where: How to name the record in error messages (no content is ever quoted).

    Returns:
        The conversation as ``[{"role": ..., "content": ...}, ...]``.

    Raises:
        DataError: The record matches neither accepted form.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object")
    has_pc = "prompt" in record or "completion" in record
    has_messages = "messages" in record
    if has_pc and has_messages:
        raise DataError(f"{where}: give either prompt/completion or messages, not both")
    if has_pc:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        if not completion.strip():
            raise DataError(f"{where}: 'completion' is empty")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if has_messages:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        out: list[dict[str, str]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DataError(f"{where}: messages[{i}] must be an object")
            role, content = message.get("role"), message.get("content")
            if role not in _ROLES:
                raise DataError(f"{where}: messages[{i}].role must be one of system, user, assistant")
            if not isinstance(content, str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
            out.append({"role": str(role), "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{where}: no assistant message, so nothing to learn")
        return out
    raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages'")


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a JSONL dataset.

    Args:
        path: The JSONL file (UTF-8, one JSON object per line).

    Returns:
        The records, in file order.

    Raises:
        DataError: The file cannot be read, or a line is not a valid record (the message names
            the file and the 1-based line number).
        EmptyDatasetError: The file holds no record.
    """
    file = Path(path)
    name = str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", path=name) from None
    except IsADirectoryError:
        raise DataError("is a directory, expected a JSONL file", path=name) from None
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or type(exc).__name__})", path=name) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    records: list[dict[str, Any]] = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("not valid UTF-8", path=name, line=number) from None
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON ({exc.msg} at column {exc.colno})", path=name, line=number
            ) from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"invalid JSON ({type(exc).__name__})", path=name, line=number) from None
        if not isinstance(value, dict):
            raise DataError("expected a JSON object per line", path=name, line=number)
        try:
            to_messages(value, where="record")
        except DataError as exc:
            raise DataError(str(exc).removeprefix("record: "), path=name, line=number) from None
        records.append(value)
    if not records:
        raise EmptyDatasetError("the dataset holds no record", path=name)
    return records


# --------------------------------------------------------------------------- tokenisation


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One training sequence.

    Attributes:
        input_ids: Token ids of the rendered conversation (after truncation).
        labels: Same length as ``input_ids``; the token id where the loss applies and
            :data:`IGNORE_INDEX` elsewhere. Labels are aligned with ``input_ids`` (Hugging Face
            convention): the model shifts them by one internally.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    @property
    def length(self) -> int:
        """Number of tokens."""
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        """Number of positions that count in the loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # pragma: no cover - transformers returns str with tokenize=False
        raise TrainingConfigError("the chat template did not render to text")
    return text


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of the assistant turns."""
    try:
        full = _render(tokenizer, messages, generation_prompt=False)
    except Exception as exc:  # Jinja errors (e.g. a template that enforces role alternation).
        raise DataError(
            f"{where}: the chat template cannot render this conversation ({type(exc).__name__})"
        ) from None
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prefix = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        except Exception as exc:  # Jinja errors from a template that rejects a partial conversation.
            raise DataError(
                f"{where}: the chat template cannot render this conversation ({type(exc).__name__})"
            ) from None
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise DataError(
                f"{where}: the chat template renders this conversation differently when it is extended, "
                "so assistant tokens cannot be located (does it start with an assistant turn?)"
            )
        # The turn's trailing whitespace (the newline after the end-of-turn token) is markup.
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def tokenize_examples(
    records: Iterable[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> list[TokenizedExample]:
    """Render records with the chat template and mask everything but assistant tokens.

    Args:
        records: Prompt/completion or chat-messages records (e.g. from :func:`load_jsonl`).
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        max_length: Maximum sequence length; longer sequences are cut from the right.

    Returns:
        One :class:`TokenizedExample` per record that keeps at least one supervised token after
        truncation, in input order.

    Raises:
        TrainingConfigError: ``max_length`` < 2, or the tokenizer is not a fast tokenizer with a
            chat template.
        DataError: A record is malformed.
        EmptyDatasetError: No example is left.
    """
    if max_length < 2:
        raise TrainingConfigError(f"max_length must be at least 2, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TrainingConfigError("a fast (Rust) tokenizer is needed to locate assistant tokens")
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingConfigError("the tokenizer has no chat template")
    texts: list[str] = []
    all_spans: list[list[tuple[int, int]]] = []
    for index, record in enumerate(records):
        where = f"record {index}"
        full, spans = _assistant_spans(tokenizer, to_messages(record, where=where), where)
        texts.append(full)
        all_spans.append(spans)
    if not texts:
        raise EmptyDatasetError("the dataset holds no record")
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples: list[TokenizedExample] = []
    dropped = 0
    for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
        labels = [
            tok if end > start and any(start < hi and end > lo for lo, hi in spans) else IGNORE_INDEX
            for tok, (start, end) in zip(ids, offsets)
        ]
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append(TokenizedExample(input_ids=tuple(ids), labels=tuple(labels)))
    if dropped:
        _log.warning(
            "%d of %d examples had no assistant token within max_length=%d and were dropped",
            dropped,
            len(texts),
            max_length,
        )
    if not examples:
        raise EmptyDatasetError(f"no example keeps an assistant token within max_length={max_length}")
    return examples


# --------------------------------------------------------------------------- batching


@dataclasses.dataclass(frozen=True)
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: ``(B, T)`` int64 token ids; padding positions hold ``pad_id``.
        attention_mask: ``(B, T)`` int64, 1 on real tokens and 0 on padding.
        labels: ``(B, T)`` int64, :data:`IGNORE_INDEX` outside assistant tokens and on padding.
        lengths: ``(B,)`` int64 number of real tokens per example.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """Return the batch moved to ``device``."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            lengths=self.lengths.to(device),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Return the keyword arguments for a Hugging Face causal LM's forward (no labels)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(examples: Sequence[TokenizedExample], pad_id: int, *, pad_to_length: int | None = None) -> Batch:
    """Right-pad examples into one :class:`Batch`.

    Args:
        examples: At least one example.
        pad_id: Token id written into padding positions (masked out of attention and loss).
        pad_to_length: Pad every row to this length instead of the longest example (for fixed
            shapes); it must be at least the longest example.

    Returns:
        The batch, on the CPU.

    Raises:
        ValueError: ``examples`` is empty or ``pad_to_length`` is too small.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example (skip empty Poisson batches before collating)")
    longest = max(ex.length for ex in examples)
    width = longest if pad_to_length is None else pad_to_length
    if width < longest:
        raise ValueError(f"pad_to_length={pad_to_length} is shorter than the longest example ({longest})")
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = ex.length
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        attention[row, :n] = 1
    lengths = torch.tensor([ex.length for ex in examples], dtype=torch.long)
    return Batch(input_ids=input_ids, attention_mask=attention, labels=labels, lengths=lengths)


# --------------------------------------------------------------------------- split + commitment


def train_eval_split(
    items: Sequence[T], *, eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Split items deterministically into a training and a held-out part.

    Item ``i`` is ranked by ``SHA-256("tensafe/train-eval-split/v1\\n" || seed (8 bytes, big
    endian, signed) || i (8 bytes, big endian))``; the ``round(n * eval_fraction)`` items with the
    smallest keys (at least one) are held out. Both parts keep the input order. The result depends
    only on ``n``, ``eval_fraction`` and ``seed``, never on the Python version.

    Args:
        items: At least two items.
        eval_fraction: Fraction held out, strictly between 0 and 1.
        seed: Selects a different split.

    Returns:
        ``(train, held_out)``, both non-empty.

    Raises:
        TrainingConfigError: ``eval_fraction`` is outside (0, 1) or fewer than two items.
    """
    n = len(items)
    if not 0.0 < eval_fraction < 1.0:
        raise TrainingConfigError(f"eval_fraction must be strictly between 0 and 1, got {eval_fraction}")
    if n < 2:
        raise TrainingConfigError(f"at least two examples are needed to hold some out, got {n}")
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    seed_bytes = int(seed).to_bytes(8, "big", signed=True)

    def key(i: int) -> bytes:
        return hashlib.sha256(_SPLIT_LABEL + seed_bytes + i.to_bytes(8, "big")).digest()

    held = set(sorted(range(n), key=key)[:n_eval])
    train = [items[i] for i in range(n) if i not in held]
    evaluation = [items[i] for i in range(n) if i in held]
    return train, evaluation


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


class CommitmentMismatchError(TrainingError):
    """The data set does not match the recorded commitment (other records, or another key)."""


def records_sha256(records: Iterable[Mapping[str, Any]]) -> str:
    """Return the plain, unkeyed SHA-256 of records (see :func:`dataset_sha256`).

    Never publish it: anyone can hash candidate data sets and compare. Training evidence
    carries :func:`records_commitment` instead.
    """
    digest = hashlib.sha256(_SHA256_LABEL)
    for record in records:
        digest.update(_canonical(record))
        digest.update(b"\n")
    return digest.hexdigest()


def dataset_sha256(path: str | os.PathLike[str]) -> str:
    """Return the plain SHA-256 of a JSONL dataset's records, for its owner's bookkeeping.

    The digest is ``SHA-256("tensafe/dataset-commitment/v1\\n" || c_1 || "\\n" || ... ||
    c_n || "\\n")`` where ``c_i`` is record ``i`` (file order, blank lines skipped) serialised
    as canonical JSON: keys sorted, separators ``","`` and ``":"``, no ASCII escaping, UTF-8.
    Whitespace, key order and escaping in the file therefore do not change it. (The label is
    the one of the former unkeyed commitment, so values printed by earlier versions compare.)

    It is NOT a commitment that may be shown to others: a field with few possible values
    (a diagnosis, a yes/no answer) is recovered from it by hashing each candidate. Use
    :func:`dataset_commitment` with a secret key for anything that leaves the data owner.

    Raises:
        DataError: The file is malformed.
        EmptyDatasetError: The file holds no record.
    """
    return records_sha256(load_jsonl(path))


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != COMMITMENT_KEY_BYTES:
        raise TrainingConfigError(f"a dataset commitment key is {COMMITMENT_KEY_BYTES} random bytes")
    return bytes(key)


def _keyed(records: Iterable[Mapping[str, Any]], key: bytes) -> bytes:
    digest = KeyedDigest(_check_key(key), label=_COMMITMENT_LABEL)
    for record in records:
        digest.update(_canonical(record))
        digest.update(b"\n")
    return digest.digest()


def records_commitment(records: Iterable[Mapping[str, Any]], *, key: bytes) -> str:
    """Return the keyed commitment of records already in memory (see :func:`dataset_commitment`).

    Raises:
        TrainingConfigError: ``key`` is not 32 bytes.
    """
    return _keyed(records, key).hex()


def dataset_commitment(path: str | os.PathLike[str], *, key: bytes) -> str:
    """Return the keyed commitment (scheme ``hmac-sha256/v2``) to a JSONL dataset's records.

    The commitment is ``HMAC-SHA256(key, "tensafe/dataset-commitment/v2" || 0x00 || c_1 ||
    "\\n" || ... || c_n || "\\n")`` with ``c_i`` as in :func:`dataset_sha256`, written as 64
    lower-case hex digits. Any change to a record, to the order or to the number of records
    changes it; without ``key`` nobody can compute it, so it reveals nothing about the data to
    whoever sees it (a package's recipients, an auditor) and cannot be used to confirm a guess.

    Args:
        path: A JSONL dataset accepted by :func:`load_jsonl`.
        key: The run's 32-byte commitment key (:func:`read_commitment_key`).

    Raises:
        DataError: The file is malformed.
        EmptyDatasetError: The file holds no record.
        TrainingConfigError: ``key`` is not 32 bytes.
    """
    return records_commitment(load_jsonl(path), key=key)


def verify_records_commitment(records: Iterable[Mapping[str, Any]], *, key: bytes, expected: str) -> str:
    """Return the commitment of ``records`` if it is ``expected`` (constant-time comparison), else raise.

    Raises:
        CommitmentMismatchError: The records (or the key) are not the ones committed to.
        TrainingConfigError: ``key`` is not 32 bytes.
    """
    actual = _keyed(records, key)
    try:
        wanted = bytes.fromhex(expected) if isinstance(expected, str) else b""
    except ValueError:
        wanted = b""
    if not hmac.compare_digest(actual, wanted):
        raise CommitmentMismatchError(
            "the data set does not match the dataset commitment: other records, another order, "
            "or not the key of the run that recorded it"
        )
    return actual.hex()


def new_commitment_key() -> bytes:
    """Return a fresh random 32-byte commitment key (operating-system CSPRNG)."""
    return secrets.token_bytes(COMMITMENT_KEY_BYTES)


def write_commitment_key(path: str | os.PathLike[str], key: bytes) -> Path:
    """Write ``key`` to a new key file, owner-readable only (mode 0600), atomically.

    The file is JSON: ``{"format": "tensafe.dataset-commitment-key/v1", "scheme":
    "hmac-sha256/v2", "key": "<64 hex digits>"}``. It is never overwritten: a different key
    would orphan the commitments recorded with the old one.

    Raises:
        DataError: A file already exists at ``path``.
        TrainingConfigError: ``key`` is not 32 bytes.
    """
    target = Path(path)
    payload = {"format": COMMITMENT_KEY_FORMAT, "key": _check_key(key).hex(), "scheme": COMMITMENT_SCHEME}
    if target.exists() or target.is_symlink():
        raise DataError("a dataset commitment key already exists; it is never overwritten", path=str(target))
    atomic_write_bytes(target, (json.dumps(payload, sort_keys=True) + "\n").encode("ascii"), mode=0o600)
    return target


def read_commitment_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by :func:`write_commitment_key`.

    Raises:
        DataError: The file is missing, readable by group or others, or not a key file.
    """
    target = Path(path)
    name = str(target)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise DataError("no such dataset commitment key file", path=name) from None
    except OSError as exc:
        raise DataError(
            f"cannot read the key file ({exc.strerror or type(exc).__name__})", path=name
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError("not a regular file", path=name)
        if info.st_mode & 0o077:
            raise DataError(
                f"the key file is accessible by group or others; run 'chmod 600 {name}'", path=name
            )
        raw = handle.read(_MAX_KEY_FILE_BYTES + 1)
    bad = DataError(f"not a dataset commitment key file ({COMMITMENT_KEY_FORMAT})", path=name)
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise bad
    try:
        doc = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise bad from None
    if not isinstance(doc, dict) or doc.get("format") != COMMITMENT_KEY_FORMAT:
        raise bad
    if doc.get("scheme") != COMMITMENT_SCHEME:
        raise DataError(
            f"unsupported commitment scheme {str(doc.get('scheme'))[:40]!r}; this TenSafe reads "
            f"{COMMITMENT_SCHEME!r}",
            path=name,
        )
    value = doc.get("key")
    try:
        key = (
            bytes.fromhex(value) if isinstance(value, str) and len(value) == 2 * COMMITMENT_KEY_BYTES else b""
        )
    except ValueError:
        key = b""
    if len(key) != COMMITMENT_KEY_BYTES:
        raise bad
    return key
