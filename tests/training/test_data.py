"""JSONL loading, chat rendering, label masking, batching, split and commitment."""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensafe.training.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    dataset_sha256,
    load_jsonl,
    records_sha256,
    tokenize_examples,
    train_eval_split,
)
from tensafe.training.errors import DataError, EmptyDatasetError, TrainingConfigError, TrainingError

END = "<|im_end|>"


def _write(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _targets(tokenizer: Any, ex: TokenizedExample) -> list[int]:
    return [label for label in ex.labels if label != IGNORE_INDEX]


# ----------------------------------------------------------------- load_jsonl


def test_load_both_forms_and_skip_blank_lines(tmp_path: pathlib.Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "p", "completion": "c", "id": 7}),
            "",
            "   ",
            json.dumps(
                {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
            ),
        ],
    )
    records = load_jsonl(path)
    assert [sorted(r) for r in records] == [["completion", "id", "prompt"], ["messages"]]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"prompt": "p", "completion": }', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "p"}', "'prompt' and 'completion' must both be strings"),
        ('{"prompt": "p", "completion": "   "}', "'completion' is empty"),
        ('{"text": "x"}', "expected keys"),
        ('{"prompt": "p", "completion": "c", "messages": []}', "not both"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"prompt": NaN, "completion": "c"}', "invalid JSON"),
    ],
)
def test_malformed_line_reports_file_and_line(tmp_path: pathlib.Path, line: str, fragment: str) -> None:
    good = json.dumps({"prompt": "secret-prompt", "completion": "secret-completion"})
    path = _write(tmp_path / "bad.jsonl", [good, "", line, good])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert fragment in message
    assert info.value.path == str(path) and info.value.line == 3
    assert "secret" not in message
    assert isinstance(info.value, TrainingError)


def test_invalid_utf8_reports_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        load_jsonl(path)


def test_bom_is_accepted(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert load_jsonl(path) == [{"prompt": "a", "completion": "b"}]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path: pathlib.Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(EmptyDatasetError, match="no record"):
        load_jsonl(path)


def test_missing_file_and_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_jsonl(tmp_path)


def test_data_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DataError("bad", path="f.jsonl", line=4)))
    assert str(err) == "f.jsonl:4: bad" and err.line == 4 and err.path == "f.jsonl"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_load_jsonl_only_raises_data_errors(tmp_path: pathlib.Path, data: bytes) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        records = load_jsonl(path)
    except DataError:
        return
    assert records and all(isinstance(r, dict) for r in records)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(["prompt", "completion", "messages", "role", "content", "x"]), c, max_size=4
            )
        ),
        max_leaves=10,
    )
)
def test_fuzz_structured_json_only_raises_data_errors(tmp_path: pathlib.Path, obj: Any) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_text(json.dumps(obj) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(DataError):
        load_jsonl(path)


# ----------------------------------------------------------------- masking


def test_prompt_completion_mask_matches_chat_template_oracle(tiny_tokenizer: Any) -> None:
    record = {"prompt": "Summarize: the cat sat on the mat.", "completion": "Cat sat."}
    [ex] = tokenize_examples([record], tiny_tokenizer, max_length=256)
    # Oracle: Hugging Face's own tokenised rendering of the prompt with a generation prompt.
    messages = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
    full = list(tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    prompt = list(
        tiny_tokenizer.apply_chat_template(
            messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    assert list(ex.input_ids) == full
    assert full[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in ex.labels[: len(prompt)])
    expected = full[len(prompt) : -1]  # Completion tokens and <|im_end|>, not the trailing newline.
    assert list(ex.labels[len(prompt) : -1]) == expected
    assert ex.labels[-1] == IGNORE_INDEX
    assert tiny_tokenizer.decode(_targets(tiny_tokenizer, ex)) == "Cat sat." + END
    assert ex.num_target_tokens == len(expected)


def test_chat_messages_mask_only_assistant_turns(tiny_tokenizer: Any) -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    [ex] = tokenize_examples([record], tiny_tokenizer, max_length=256)
    assert tiny_tokenizer.decode(list(ex.input_ids)) == tiny_tokenizer.apply_chat_template(
        record["messages"], tokenize=False
    )
    # Contiguous runs of supervised tokens, decoded, are exactly the two assistant turns.
    runs: list[list[int]] = []
    previous = False
    for label in ex.labels:
        current = label != IGNORE_INDEX
        if current:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = current
    assert [tiny_tokenizer.decode(r) for r in runs] == ["Hello there!" + END, "Goodbye." + END]


_SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="<|")


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.text(_SAFE, max_size=40),
    completion=st.text(_SAFE, min_size=1, max_size=40).filter(lambda s: s.strip() and not s[0].isspace()),
)
def test_property_targets_decode_to_completion(tiny_tokenizer: Any, prompt: str, completion: str) -> None:
    [ex] = tokenize_examples(
        [{"prompt": prompt, "completion": completion}], tiny_tokenizer, max_length=10_000
    )
    # SmolLM2's byte-level vocabulary silently drops a few bytes (some control characters and
    # 4-byte UTF-8 lead bytes): compare with what the tokenizer itself can represent.
    representable = tiny_tokenizer.decode(tiny_tokenizer(completion, add_special_tokens=False).input_ids)
    decoded = tiny_tokenizer.decode(_targets(tiny_tokenizer, ex))
    # A byte-level BPE token may merge the template's newline with the first content byte.
    assert decoded in (representable + END, "\n" + representable + END)
    assert tiny_tokenizer.decode(list(ex.input_ids)).endswith(representable + END + "\n")


def test_truncation_and_dropping(tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    long = {"prompt": "word " * 50, "completion": "done"}
    short = {"prompt": "hi", "completion": "ok then"}
    full = tokenize_examples([short], tiny_tokenizer, max_length=1000)[0]
    cut = tokenize_examples([short], tiny_tokenizer, max_length=full.length - 2)[0]
    assert cut.input_ids == full.input_ids[: full.length - 2]
    assert cut.labels == full.labels[: full.length - 2]
    with caplog.at_level("WARNING"):
        kept = tokenize_examples([long, short], tiny_tokenizer, max_length=full.length)
    assert kept == [full]
    assert "1 of 2 examples" in caplog.text
    with pytest.raises(EmptyDatasetError):
        tokenize_examples([long], tiny_tokenizer, max_length=20)
    with pytest.raises(EmptyDatasetError):
        tokenize_examples([], tiny_tokenizer, max_length=20)
    with pytest.raises(TrainingConfigError):
        tokenize_examples([short], tiny_tokenizer, max_length=1)


def test_tokenize_reports_bad_record_index(tiny_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="record 1: no assistant message"):
        tokenize_examples(
            [{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "x"}]}],
            tiny_tokenizer,
            max_length=64,
        )
    with pytest.raises(DataError, match="record 0: the chat template"):
        tokenize_examples(
            [{"messages": [{"role": "assistant", "content": "x"}]}], tiny_tokenizer, max_length=64
        )


# ----------------------------------------------------------------- collate


def test_collate_right_pads_and_masks(tiny_tokenizer: Any) -> None:
    examples = [
        TokenizedExample(input_ids=(5, 6, 7), labels=(-100, 6, 7)),
        TokenizedExample(input_ids=(8,), labels=(8,)),
    ]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.lengths.tolist() == [3, 1]
    assert len(batch) == 2 and batch.input_ids.dtype == torch.long
    wide = collate(examples, pad_id=9, pad_to_length=5)
    assert wide.input_ids.tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    with pytest.raises(ValueError, match="shorter"):
        collate(examples, pad_id=0, pad_to_length=2)
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask"}


def _example_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_padding_contributes_nothing(tiny_tokenizer: Any, tiny_llama: Any) -> None:
    records = [
        {"prompt": "Name a colour.", "completion": "Blue."},
        {
            "prompt": "Write a longer answer about the weather today please.",
            "completion": "It is sunny and warm.",
        },
    ]
    examples = tokenize_examples(records, tiny_tokenizer, max_length=128)
    batch = collate(examples, tiny_tokenizer.pad_token_id, pad_to_length=max(e.length for e in examples) + 7)
    with torch.no_grad():
        batched = [
            _example_loss(
                tiny_llama,
                batch.input_ids[i : i + 1],
                batch.attention_mask[i : i + 1],
                batch.labels[i : i + 1],
            )
            for i in range(len(batch))
        ]
        for i, ex in enumerate(examples):
            ids = torch.tensor([ex.input_ids])
            single = _example_loss(tiny_llama, ids, torch.ones_like(ids), torch.tensor([ex.labels]))
            torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- split


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 300), frac=st.floats(0.01, 0.99), seed=st.integers(-(2**63), 2**63 - 1))
def test_split_is_a_deterministic_partition(n: int, frac: float, seed: int) -> None:
    items = list(range(n))
    train, held = train_eval_split(items, eval_fraction=frac, seed=seed)
    assert (train, held) == train_eval_split(items, eval_fraction=frac, seed=seed)
    assert sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)
    assert len(held) == min(max(1, round(n * frac)), n - 1)


def test_split_depends_on_seed_and_matches_spec() -> None:
    items = [f"r{i}" for i in range(100)]
    a = train_eval_split(items, eval_fraction=0.2, seed=1)[1]
    b = train_eval_split(items, eval_fraction=0.2, seed=2)[1]
    assert a != b
    # Recompute the documented rule by hand.
    keys = {
        i: hashlib.sha256(
            b"tensafe/train-eval-split/v1\n" + (1).to_bytes(8, "big") + i.to_bytes(8, "big")
        ).digest()
        for i in range(100)
    }
    expected = sorted(sorted(keys, key=keys.__getitem__)[:20])
    assert a == [items[i] for i in expected]


@pytest.mark.parametrize(("items", "frac"), [([1], 0.5), ([1, 2], 0.0), ([1, 2], 1.0)])
def test_split_rejects_bad_input(items: list[int], frac: float) -> None:
    with pytest.raises(TrainingConfigError):
        train_eval_split(items, eval_fraction=frac)


# ----------------------------------------------------------------- plain SHA-256 digest


def test_plain_sha256_matches_spec_and_ignores_formatting(tmp_path: pathlib.Path) -> None:
    records = [
        {"prompt": "é ü", "completion": "b", "id": 1},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]
    a = _write(tmp_path / "a.jsonl", [json.dumps(r) for r in records])
    b = _write(
        tmp_path / "b.jsonl",
        [
            "",
            json.dumps(records[0], indent=None, sort_keys=True, ensure_ascii=True),
            "  ",
            json.dumps(records[1], separators=(", ", " : ")),
        ],
    )
    canonical = b"".join(
        json.dumps(r, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        for r in records
    )
    expected = hashlib.sha256(b"tensafe/dataset-commitment/v1\n" + canonical).hexdigest()
    assert dataset_sha256(a) == dataset_sha256(b) == records_sha256(records) == expected
    c = _write(tmp_path / "c.jsonl", [json.dumps(r) for r in reversed(records)])
    assert dataset_sha256(c) != expected
    d = _write(tmp_path / "d.jsonl", [json.dumps(records[0] | {"completion": "B"}), json.dumps(records[1])])
    assert dataset_sha256(d) != expected
