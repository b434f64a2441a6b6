"""Training data: the loss is taken on assistant tokens only, through the model's chat template."""

from __future__ import annotations

import pytest

from mygpt.finetune.data import DataError, tokenize, validate_jsonl


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!", "weight": 1},
    ]
    t = tokenize(tokenizer, messages, max_len=4096)
    assert len(t.input_ids) == len(t.labels)
    learned = tokenizer.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != -100])
    assert "Hello there." in learned and "Goodbye!" in learned
    assert "Be brief" not in learned and "Hi" not in learned and "Bye" not in learned
    assert all(label in (-100, i) for i, label in zip(t.input_ids, t.labels, strict=True))
    skipped = tokenize(tokenizer, [*messages[:2], {**messages[2], "weight": 0}, *messages[3:]], 4096)
    assert "Hello there." not in tokenizer.decode(
        [i for i, lab in zip(skipped.input_ids, skipped.labels, strict=True) if lab != -100]
    )
    assert len(tokenize(tokenizer, messages, max_len=10).input_ids) == 10


def test_validation_counts_examples_and_skips_blank_lines():
    line = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    assert validate_jsonl(line + b"\n" + line) == 2
    with pytest.raises(DataError, match="line 2: messages\\[1\\].content"):
        validate_jsonl(
            line + b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}'
        )
