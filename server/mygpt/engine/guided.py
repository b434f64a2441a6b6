"""Structured outputs: a guided row samples only the tokens its grammar allows next.

`response_format` {"type": "json_object"} or {"type": "json_schema", ...} becomes a grammar compiled by
llguidance (the library behind vLLM's and llama.cpp's guided decoding) against the model's tokenizer.
Each row follows its own copy of the grammar's matcher: before sampling, the matcher gives the set of
allowed next tokens as a bitmask (one bit per token id); the row's disallowed logits become -inf; the
sampled token advances the matcher. When the grammar is complete (the JSON value closed), the row
finishes with "stop". Measured on the 2-core CPU with the default model: ~10 us per row and step for
the mask and ~25 us to apply it to a 49,152-token row, against a ~30 ms decode step.

Compiling runs off the engine thread (the HTTP layer compiles while it validates the request); the
engine only copies the compiled matcher for each row. llguidance is imported on first use.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# JSON as models mostly saw it: ", " and ": " between items, no other whitespace. Free whitespace lets a
# weak model fill max_tokens with blanks inside an open object (measured with the test models).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled; the message says why."""


# the keywords whose values are schemas (one, a list, or a name -> schema map): closed_schema() walks them
_SUBSCHEMA = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames")
_SUBSCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COMPOSED = ("allOf", "anyOf", "oneOf", "$ref")  # beside properties: the object is more than they say


def closed_schema(schema: Any) -> Any:
    """`schema` with each object schema that names its properties and leaves additionalProperties out
    closed to other keys (additionalProperties false), as OpenAI's strict schemas are and as vLLM and
    xgrammar compile them: a tool's arguments or an answer hold the keys the schema declares, where JSON
    Schema's default would let a model add any. A schema that sets additionalProperties keeps it. An
    object whose keys other schemas also declare stays open, since closing it would refuse theirs (the
    parts are intersected): one with allOf, anyOf, oneOf or $ref beside its properties and the branches
    under it, an allOf's members and the definitions they refer to, and one that requires a key its
    properties do not name."""
    shared = set()  # the definitions ("#/$defs/x") that allOf members refer to

    def refs(node: Any) -> None:
        if isinstance(node, dict):
            for member in node.get("allOf") or []:
                if isinstance(member, dict) and isinstance(member.get("$ref"), str):
                    shared.add(member["$ref"])
            for value in node.values():
                refs(value)
        elif isinstance(node, list):
            for value in node:
                refs(value)

    def walk(node: Any, open_: bool = False, at: str = "#") -> Any:
        if isinstance(node, list):
            return [walk(s, open_) for s in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        composed = any(k in out for k in _COMPOSED) and ("properties" in out or "patternProperties" in out)
        for key in _SUBSCHEMA:
            if isinstance(out.get(key), dict):
                out[key] = walk(out[key])
        for key in _SUBSCHEMAS:
            if isinstance(out.get(key), list):  # an allOf's members, and the branches of a composed object
                out[key] = [walk(s, open_=key == "allOf" or composed) for s in out[key]]
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                where = f"{at}/{key}" if at == "#" and key in ("$defs", "definitions") else None
                out[key] = {
                    name: walk(s, open_=where is not None and f"{where}/{name}" in shared)
                    for name, s in out[key].items()
                }
        if isinstance(out.get("items"), list):  # (draft 4-7 tuples)
            out["items"] = walk(out["items"])
        names = set(out.get("properties") or {})
        required = out.get("required") if isinstance(out.get("required"), list) else []
        if (
            "additionalProperties" not in out
            and ("properties" in out or "patternProperties" in out)
            and not (open_ or composed or any(r not in names for r in required))
        ):
            out["additionalProperties"] = False
        return out

    refs(schema)
    return walk(schema)


class Grammar:
    """A compiled grammar in its start state; each row follows a copy (Grammar.start)."""

    def __init__(self, matcher: Any, source: str):
        self._matcher = matcher
        self.source = source  # llguidance's grammar text, for logs and tests

    def start(self, prompt_ids: Sequence[int] = ()) -> Guide:
        return Guide(self._matcher.deep_copy())


class ThinkFirst:
    """A grammar that holds from the end of a reasoning model's thinking (api/reasoning.py): any token
    but an end between its <think> and </think> tokens (a guided answer must come), then line breaks
    free, then the grammar's. A row whose prompt ends inside <think> (the R1 distills' templates)
    starts inside its thinking; any other row's first token is the grammar's or <think>. For
    tokenizers where each tag is one token (Qwen3, the R1 distills): the grammar sees only the answer."""

    def __init__(self, grammar: Grammar, open_id: int, close_id: int, blank: bytes):
        self.grammar, self.open_id, self.close_id = grammar, open_id, close_id
        self.blank = blank  # bitmask of the line-break tokens (llguidance's layout and width)
        self.source = grammar.source

    def start(self, prompt_ids: Sequence[int] = ()) -> ThinkingGuide:
        # the generation prompt's last tokens only: a <think> in a user's message says nothing
        tail = list(prompt_ids[-4:])
        last = {
            t: max((i for i, x in enumerate(tail) if x == t), default=-1)
            for t in (self.open_id, self.close_id)
        }
        return ThinkingGuide(self, self.grammar.start(), inside=last[self.open_id] > last[self.close_id])


class ThinkingGuide:
    """One row's place in a ThinkFirst grammar: "start" (the grammar's first token, or <think>),
    "thinking" (anything), "gap" (blank tokens, or the grammar's first), "grammar"."""

    def __init__(self, spec: ThinkFirst, guide: Guide, inside: bool):
        self.spec, self.guide = spec, guide
        self.state = "thinking" if inside else "start"

    def allowed(self, eos: Collection[int] = ()) -> bytes | None:
        """The grammar's mask, and <think> at the start or line breaks after </think>; while thinking,
        every token but the ends (a guided row ends with its grammar's answer, not in its thinking)."""
        if self.state == "thinking":
            if not eos:
                return None
            bits = bytearray(b"\xff" * len(self.spec.blank))
            for t in eos:
                if t // 8 < len(bits):
                    bits[t // 8] &= ~(1 << (t % 8)) & 0xFF
            return bytes(bits)
        mask = self.guide.allowed(eos)
        if self.state == "grammar":
            return mask
        bits = bytearray(mask)
        if self.state == "start":
            t = self.spec.open_id
            if t // 8 < len(bits):
                bits[t // 8] |= 1 << (t % 8)
        else:
            for i, b in enumerate(self.spec.blank[: len(bits)]):
                bits[i] |= b
        return bytes(bits)

    @property
    def accepting(self) -> bool:
        return self.state != "thinking" and self.guide.accepting

    def advance(self, token: int) -> bool:
        if self.state == "start":
            if token == self.spec.open_id:
                self.state = "thinking"
                return True
            self.state = "grammar"
        elif self.state == "thinking":
            if token == self.spec.close_id:
                self.state = "gap"
            return True
        elif self.state == "gap":
            if token // 8 < len(self.spec.blank) and self.spec.blank[token // 8] >> (token % 8) & 1:
                return True  # line breaks between </think> and the answer: the grammar never sees them
            self.state = "grammar"
        return self.guide.advance(token)

    @property
    def done(self) -> bool:
        return self.state == "grammar" and self.guide.done

    @property
    def error(self) -> str:
        return self.guide.error


class Guide:
    """One row's place in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def allowed(self, eos: Collection[int] = ()) -> bytes:
        """The tokens allowed next: bit t % 8 of byte t // 8 is token t's (llguidance's bitmask). eos:
        the model's end-of-sequence ids, allowed wherever the grammar may end (llguidance knows only the
        tokenizer's own; a model may end its turn with another, as Llama 3's <|eot_id|>)."""
        mask = self._matcher.compute_bitmask()
        if eos and self._matcher.is_accepting():
            bits = bytearray(mask)
            for t in eos:
                if t // 8 < len(bits):
                    bits[t // 8] |= 1 << (t % 8)
            mask = bytes(bits)
        return mask

    @property
    def accepting(self) -> bool:
        """The grammar may end here: an end-of-sequence token ends the row (not advanced through it)."""
        return self._matcher.is_accepting()

    def advance(self, token: int) -> bool:
        """Follows a sampled token; False if the grammar cannot take it (see error)."""
        return bool(self._matcher.consume_token(token)) and not self._matcher.is_error()

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return _clean(self._matcher.get_error())


class Grammars:
    """Compiles grammars for one tokenizer and logits width, and gives each token's bytes (thread-safe).
    The llguidance view of the tokenizer is built on first use (~0.2 s for a 49k-token vocabulary) and
    shared."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._hf_tokenizer = tokenizer
        # the logits' width; a tokenizer may hold more tokens than the model has rows (never sampled)
        self.vocab_size = vocab_size
        self._tokenizer = None
        self._unavailable: str | None = None  # why llguidance cannot read this tokenizer
        self._blank: bytes | None = None  # blank_mask()
        self._lock = threading.Lock()

    def json(self, schema: dict[str, Any] | bool | None) -> Grammar:
        """A grammar for one JSON value of `schema` (a JSON Schema; objects that name their properties
        take no other keys unless it says so: closed_schema()); None: any JSON object."""
        from llguidance import LLMatcher

        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("the schema must be a JSON object")
        try:
            source = LLMatcher.grammar_from_json_schema(closed_schema(schema), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(str(exc)) from exc
        return self._compile(source)

    def json_or_text(
        self,
        schema: dict[str, Any],
        tags: tuple[str, str] | None = None,
        many: bool = True,
        answer: dict[str, Any] | None = None,
    ) -> Grammar:
        """One JSON value of `schema`; or, with tags (open, close), one or more such values (one if not
        `many`) each between them (a line break allowed inside each tag, blocks one per line); or text that cannot be taken
        for either (tool_choice "auto": a call is the JSON, an answer the text). The text ends where the
        model ends it; it may not start with '{' or the open tag, even after whitespace, so that what
        starts like a call is held to one. With `answer` (a JSON Schema: tool_choice "auto" with a
        response_format), one JSON value of it in place of the text, and the calls only between the tags
        (a bare call and an answer both start with '{': the grammar could finish a call's start as an
        answer). The tags: no quote, backslash or whitespace (nor '/' in the open tag, which goes into a
        regular expression)."""
        from llguidance import LLMatcher

        if not isinstance(schema, dict):
            raise GrammarError("the schema must be a JSON object")
        value = {**closed_schema(schema), "x-guidance": JSON_OPTIONS}
        rules = ["value"]
        starts = [r"[^{\s]"]  # what a text may start with (after whitespace), then anything
        ends = []  # the texts that stop inside the open tag
        lines = [f"value: %json {json.dumps(value)}"]
        if tags is not None:
            opened, closed = tags
            if (
                any(c in '"\\' or c.isspace() for c in opened + closed)
                or "/" in opened
                or not opened
                or not closed
            ):
                raise ValueError(f"tags must be plain characters: {tags!r}")
            rules.append("tagged")
            more = ' ("\\n" block)*' if many else ""
            lines += [f"tagged: block{more}", f'block: "{opened}" "\\n"? value "\\n"? "{closed}"']
            starts = [rf"[^{{\s{re.escape(opened[0])}]"]
            starts += [re.escape(opened[:i]) + f"[^{re.escape(opened[i])}]" for i in range(1, len(opened))]
            ends = [re.escape(opened[:i]) for i in range(1, len(opened))]
        text = r"\s*(?:(?:" + "|".join(starts) + r")[\s\S]*" + "".join("|" + e for e in ends) + ")"
        if answer is None:  # text that cannot be taken for a call
            rules.append("TEXT")
            lines.append(f"TEXT: /{text}/")
        else:  # calls in their tags only: a bare one could not be told from an answer that looks like one
            if tags is None:
                raise ValueError("an answer beside the calls needs the calls' tags")
            rules = ["tagged", "answer"]
            lines.append(f"answer: %json {json.dumps({**closed_schema(answer), 'x-guidance': JSON_OPTIONS})}")
        lark = "\n".join([f"start: {' | '.join(rules)}", *lines, ""])
        try:
            source = LLMatcher.grammar_from_lark(lark)
        except (ValueError, TypeError) as exc:
            raise GrammarError(str(exc)) from exc
        return self._compile(source)

    def blank_mask(self) -> bytes:
        """The bitmask (llguidance's layout) of the tokens that are line breaks alone (ThinkFirst's gap,
        as the answer's splitter trims them); computed once, ~0.1 s for 50k tokens."""
        with self._lock:
            if self._blank is not None:
                return self._blank
        # as wide as llguidance's masks (32-bit words over its tokenizer's n_vocab: _llg_tokenizer)
        bits = bytearray((max(self.vocab_size, len(self._hf_tokenizer)) + 31) // 32 * 4)
        for t in range(self.vocab_size):
            b = self.token_bytes(t)
            if b and not b.strip(b"\r\n"):
                bits[t // 8] |= 1 << (t % 8)
        with self._lock:
            self._blank = bytes(bits)
        return self._blank

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, which may be part of a UTF-8 character (byte-level BPE pieces of an
        emoji, say); a special token's are its text. Without llguidance's view of the tokenizer: the
        token decoded alone (a piece of a character becomes U+FFFD)."""
        try:
            return self._llg_tokenizer().decode_bytes([token_id])
        except GrammarError:
            return self._hf_tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _compile(self, source: str) -> Grammar:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._llg_tokenizer(), source, log_level=0)
        if matcher.is_error():
            raise GrammarError(_clean(matcher.get_error()))
        # the first step, twice: a grammar no token can start fails only here, and one past the
        # lexer's limits (a pattern like a{1000000}) on the second mask (the copies share the lexer)
        for _ in range(2):
            probe = matcher.deep_copy()
            probe.compute_bitmask()
            if probe.is_error():
                error = _clean(probe.get_error())
                if "lexer" not in error:
                    error = f"no JSON value satisfies the schema (a $ref that only refers to itself, say): {error}"
                raise GrammarError(error)
        return Grammar(matcher, source)

    def _llg_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer; GrammarError if it cannot read it (the server still
        serves, without structured outputs)."""
        with self._lock:
            if self._tokenizer is None and self._unavailable is None:
                try:
                    import llguidance.hf

                    n_vocab = max(self.vocab_size, len(self._hf_tokenizer))
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=n_vocab)
                except Exception as exc:
                    self._unavailable = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "structured outputs are unavailable for this tokenizer: %s", self._unavailable
                    )
            if self._tokenizer is None:
                raise GrammarError(
                    f"structured outputs are unavailable for this model's tokenizer ({self._unavailable})"
                )
            return self._tokenizer


def _clean(message: str) -> str:
    """llguidance's error without its prefix, and without the parser state or backtrace it may add."""
    for cut in ("\n<state>", "<backtrace>", "\nstack backtrace"):
        message = message.split(cut, 1)[0]
    return message.removeprefix("Grammar error: ").strip()[:500]


def mask_logits(logits: torch.Tensor, allowed: dict[int, bytes]) -> torch.Tensor:
    """A copy of logits [B, V] where row i (a key of `allowed`) keeps only the logits of the tokens its
    bitmask allows (the others become -inf); token ids past the bitmask are disallowed."""
    out = logits.clone(memory_format=torch.contiguous_format)
    vocab = out.shape[-1]
    if out.device.type == "cpu":  # numpy unpacks bits ~10x faster than torch's CPU kernels here
        for i, mask in allowed.items():
            out[i] += torch.from_numpy(_bias_on_host(mask, vocab)).to(out.dtype)
    elif allowed:
        _mask_on_device(out, allowed)
    return out


def _mask_on_device(out: torch.Tensor, allowed: dict[int, bytes]) -> None:
    """mask_logits on a GPU, in place: every guided row's bits in one copy (1 bit per token), unpacked
    there, one masked fill."""
    rows = torch.tensor(list(allowed), device=out.device)
    keep = _keep_on_device(list(allowed.values()), out.shape[-1], out.device)  # [R, V]
    out[rows] = out[rows].masked_fill(~keep, float("-inf"))


def _bias_on_host(mask: bytes, vocab: int) -> np.ndarray:
    """[vocab] float32: 0 where the bitmask allows the token, -inf elsewhere."""
    bias = np.zeros(vocab, dtype=np.float32)
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab]
    bias[: bits.shape[0]] = bits
    with np.errstate(divide="ignore"):
        np.log(bias, out=bias)  # 1 -> 0, 0 -> -inf: faster than a table lookup
    return bias


def _keep_on_device(masks: list[bytes], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] bool on `device`: True where row r's bitmask allows the token (bitmasks of one
    grammar tokenizer all have the same length)."""
    packed = torch.from_numpy(np.stack([np.frombuffer(m, dtype=np.uint8) for m in masks]))
    if device.type == "cuda":
        packed = packed.pin_memory()  # an asynchronous copy, ordered before the kernels below
    words = packed.to(device, non_blocking=True)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    keep = ((words[:, :, None] >> shifts) & 1).view(len(masks), -1)[:, :vocab].bool()
    if keep.shape[1] < vocab:
        keep = torch.cat([keep, keep.new_zeros(len(masks), vocab - keep.shape[1])], dim=1)
    return keep
