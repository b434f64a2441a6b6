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


@pytest.mark.parametrize(
    "raw, reason",
    [
        # two examples apart by U+2028 (no line break for JSON Lines): splitlines took them as two lines,
        # the trainer as one, and failed the job
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\u2028'
         '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\ud800"}]}', "surrogate"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}', "weight 0"),
        # U+2028 inside a string is valid JSON: one example, for the validator and the trainer alike
        ('{"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "c"}]}', None),
    ],
)  # fmt: skip
def test_files_the_trainer_cannot_use_are_refused_at_upload(tmp_path, raw, reason):
    """The first three passed validation and then failed the job."""
    from mygpt.finetune.data import read_examples

    if reason is not None:
        with pytest.raises(DataError, match=reason):
            validate_jsonl(raw.encode())
        return
    assert validate_jsonl(raw.encode()) == 1
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw.encode())
    assert read_examples(path)[0][0]["content"] == "a\u2028b"
