"""Chat-format JSONL (OpenAI's fine-tuning format): validation that names the line, and tokenization
with the loss on assistant tokens only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "developer", "user", "assistant")


class DataError(ValueError):
    """A training file that cannot be used; the message names the line."""


def json_lines(raw: bytes) -> Iterator[tuple[int, Any]]:
    """An uploaded JSONL file's values with their line numbers (blank lines skipped); DataError names
    the line that is not JSON, or the byte that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"the file is not UTF-8 text (byte {exc.start})") from None
    for number, line in enumerate(_lines(text), start=1):
        if line.strip():
            yield number, _parse(line, number)


def validate_jsonl(raw: bytes, max_examples: int = 100_000) -> int:
    """Checks every line of an uploaded file; returns the number of examples."""
    count = 0
    for number, example in json_lines(raw):
        _check(example, number)
        count += 1
        if count > max_examples:
            raise DataError(f"more than {max_examples} examples")
    if count == 0:
        raise DataError('the file has no examples: one JSON object per line, {"messages": [...]}')
    return count


def read_examples(path) -> list[list[dict[str, str]]]:
    """The messages of every example in a validated file."""
    with open(path, "rb") as f:
        return [json.loads(line)["messages"] for line in _lines(f.read().decode("utf-8")) if line.strip()]


def _lines(text: str) -> list[str]:
    """JSON Lines: lines end at \\n (\\r\\n too). Not str.splitlines: U+2028 or \\x85 may stand
    unescaped inside a JSON string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse(line: str, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _check(example: Any, number: int) -> None:
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list):
        raise DataError(f'line {number}: expected an object with a "messages" list')
    messages = example["messages"]
    if not messages:
        raise DataError(f"line {number}: messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"line {number}: messages[{i}] is not an object")
        if m.get("role") not in ROLES:
            raise DataError(
                f"line {number}: messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}"
                " (tool and function messages are not supported)"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise DataError(f"line {number}: messages[{i}].content must be a non-empty string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"line {number}: messages[{i}].content holds a lone UTF-16 surrogate") from None
        if "weight" in m and m["weight"] not in (0, 1):
            raise DataError(f"line {number}: messages[{i}].weight must be 0 or 1")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        raise DataError(f"line {number}: no assistant message to learn from (none, or all weight 0)")


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != -100)


def tokenize(tokenizer: Any, messages: list[dict[str, Any]], max_len: int) -> Tokenized:
    """The example through the model's chat template; labels only on assistant turns (weight 1)."""
    msgs = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
        for m in messages
    ]
    ids = _render(tokenizer, msgs, generation_prompt=False)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        start = len(_render(tokenizer, msgs[:i], generation_prompt=True))
        end = len(_render(tokenizer, msgs[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Tokenized(ids[:max_len], labels[:max_len])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    )
