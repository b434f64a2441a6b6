"""Structured outputs (engine/guided.py): a random model that writes no JSON on its own writes JSON that
validates against the schema once its rows are guided, in the batched and the naive engine."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from mygpt.engine.engine import Engine
from mygpt.engine.guided import (
    GrammarError,
    Grammars,
    _bias_on_host,
    _keep_on_device,
    _mask_on_device,
    closed_schema,
    mask_logits,
)
from mygpt.engine.naive import NaiveEngine
from mygpt.engine.runner import ModelRunner
from mygpt.engine.types import FinishReason
from test_engine import PROMPTS, Collector

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
ITEMS = {  # an array at the top, objects inside, a number with a fraction
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["id", "score"],
        "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 4,
}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def grammars(tokenizer, tiny_model):
    return Grammars(tokenizer, tiny_model.config.vocab_size)


@pytest.fixture
def engine(tiny_model, tokenizer):
    runner = ModelRunner(tiny_model, num_slots=8, max_len=512, dtype=torch.float32)
    e = Engine(runner, tokenizer, [tokenizer.eos_token_id], max_num_batched_tokens=64)
    e.start()
    yield e
    e.stop()


def test_mask_keeps_exactly_the_allowed_tokens():
    rng = np.random.default_rng(0)
    vocab = 1000
    masks = {i: rng.integers(0, 256, size=126, dtype=np.uint8).tobytes() for i in (0, 2)}  # 1008 bits
    logits = torch.randn(3, vocab)
    out = mask_logits(logits, masks)
    for i in range(3):
        for t in range(vocab):
            allowed = i not in masks or (masks[i][t // 8] >> (t % 8)) & 1
            assert out[i, t] == (logits[i, t] if allowed else float("-inf"))
    short = mask_logits(logits, {1: b"\xff" * 100})  # a mask shorter than the row: the rest is not allowed
    assert torch.isfinite(short[1, :800]).all() and torch.isinf(short[1, 800:]).all()
    on_gpu = logits.clone()  # the GPU's path, run here on the CPU, agrees
    _mask_on_device(on_gpu, masks)
    assert torch.equal(on_gpu, out)
    for mask in [*masks.values(), b"\xff" * 100]:
        assert torch.equal(
            _keep_on_device([mask], vocab, torch.device("cpu"))[0],
            torch.isfinite(torch.from_numpy(_bias_on_host(mask, vocab))),
        )


def test_the_random_model_writes_no_json_unguided(engine, tokenizer):
    c = Collector()
    for i, p in enumerate(PROMPTS[:3]):
        c.submit(engine, f"r{i}", p, max_tokens=40, temperature=0.0)
    c.wait()
    for i in range(3):
        with pytest.raises(ValueError):
            json.loads(c.text(f"r{i}"))


@pytest.mark.parametrize("schema", [PERSON, ITEMS], ids=["object", "array"])
def test_guided_rows_write_valid_json_greedy_and_sampled_in_one_batch(engine, grammars, schema):
    # bounded schemas: free strings never end with a random model (json_object mode: tests/integration)
    grammar = grammars.json(schema)
    c = Collector()
    for i, p in enumerate(PROMPTS):
        sampled = {"temperature": 1.0, "seed": i, "n": 2} if i % 2 else {"temperature": 0.0}
        c.submit(engine, f"g{i}", p, max_tokens=200, grammar=grammar, **sampled)
    c.submit(engine, "free", PROMPTS[0], max_tokens=30, temperature=0.0)  # an unguided row in the batch
    c.wait()
    for i in range(len(PROMPTS)):
        for index in range(2 if i % 2 else 1):
            text = c.text(f"g{i}", index)
            assert c.finish(f"g{i}", index) == FinishReason.STOP, text
            jsonschema.validate(json.loads(text), schema)
    with pytest.raises(ValueError):
        json.loads(c.text("free"))


def test_guided_output_is_the_same_alone_and_in_a_batch(engine, grammars):
    grammar = grammars.json(PERSON)
    alone = Collector()
    alone.submit(engine, "a", PROMPTS[2], max_tokens=200, grammar=grammar, temperature=0.8, seed=7)
    alone.wait()
    busy = Collector()
    for i, p in enumerate(PROMPTS):
        busy.submit(engine, f"b{i}", p, max_tokens=60, temperature=1.0, seed=i)
    busy.submit(engine, "a", PROMPTS[2], max_tokens=200, grammar=grammar, temperature=0.8, seed=7)
    busy.wait()
    assert alone.tokens("a") == busy.tokens("a")


def test_max_tokens_cuts_guided_output_with_length(engine, grammars):
    c = Collector()
    c.submit(engine, "cut", PROMPTS[0], max_tokens=3, grammar=grammars.json(PERSON), temperature=0.0)
    c.wait()
    assert c.finish("cut") == FinishReason.LENGTH and len(c.tokens("cut")) == 3
    assert c.text("cut").startswith('{"name":')


def test_naive_engine_guides_too(tiny_model, tokenizer, grammars):
    naive = NaiveEngine(tiny_model, tokenizer, [tokenizer.eos_token_id], max_len=512)
    naive.start()
    try:
        c = Collector()
        c.submit(naive, "n", PROMPTS[1], max_tokens=200, grammar=grammars.json(PERSON), temperature=0.0)
        c.wait()
    finally:
        naive.stop()
    assert c.finish("n") == FinishReason.STOP
    jsonschema.validate(json.loads(c.text("n")), PERSON)


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "objekt"}, "objekt"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"$ref": "#"}, "no JSON value satisfies"),  # compiles, but no token can start it
        ({"type": "string", "pattern": "^a{1000000}$"}, "too many expressions"),  # past llguidance's limits
        ([1, 2], "JSON object"),
    ],
)
def test_bad_schemas_are_refused_with_the_reason(grammars, schema, message):
    with pytest.raises(GrammarError, match=message):
        grammars.json(schema)


def test_objects_that_name_their_properties_take_no_other_keys(grammars, tokenizer):
    """As OpenAI's strict schemas and vLLM's grammars: a key the schema does not declare is not allowed
    unless the schema allows it (additionalProperties), at any depth; an object that names no
    properties stays open."""

    def takes(schema, text: str) -> bool:
        guide = grammars.json(schema).start()
        return all(guide.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))

    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert takes(city, '{"city": "Oslo"}') and not takes(city, '{"city": "Oslo", "country": "NO"}')
    assert takes({**city, "additionalProperties": True}, '{"city": "Oslo", "country": "NO"}')
    assert takes({"type": "object"}, '{"any": 1}')  # json_object's schema: no properties named
    nested = {  # in arrays, anyOf and $defs too
        "type": "object",
        "properties": {"stops": {"type": "array", "items": {"$ref": "#/$defs/city"}}},
        "$defs": {"city": {"anyOf": [city, {"type": "null"}]}},
    }
    assert takes(nested, '{"stops": [{"city": "Oslo"}, null]}')
    assert not takes(nested, '{"stops": [{"city": "Oslo", "x": 1}]}')
    assert not takes(nested, '{"stops": [], "x": 1}')
    # objects composed of parts stay open: closing one part would refuse the others' keys (review)
    a, b = ({"properties": {k: {"type": "integer"}}, "required": [k]} for k in "ab")
    composed = [
        ({"type": "object", "allOf": [a, b]}, '{"a": 1, "b": 2}'),
        ({"type": "object", **a, "allOf": [b]}, '{"a": 1, "b": 2}'),
        (
            {"type": "object", **a, "anyOf": [b, {"properties": {"c": {}}, "required": ["c"]}]},
            '{"a": 1, "b": 2}',
        ),
        ({"allOf": [{"$ref": "#/$defs/base"}, b], "$defs": {"base": a}}, '{"a": 1, "b": 2}'),
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]},
            '{"a": 1, "b": 2}',
        ),
    ]
    for schema, text in composed:
        assert takes(schema, text), schema
    inner = {"type": "object", "allOf": [{"properties": {"x": city}}]}  # a part's own nested object: closed
    assert not takes(inner, '{"x": {"city": "Oslo", "y": 1}}')
    # a property named like a keyword is a name, not a schema
    named = {"type": "object", "properties": {"properties": {"type": "object"}}}
    assert closed_schema(named) == {**named, "additionalProperties": False}
    assert (
        closed_schema([city]) == [{**city, "additionalProperties": False}]
        and city.get("additionalProperties") is None
    )


def test_a_tokenizer_llguidance_cannot_read_costs_structured_outputs_only():
    """The server still starts and serves: response_format is refused (400), logprob bytes fall back
    to each token decoded alone."""

    class Odd:  # no HF fast tokenizer inside
        def __len__(self):
            return 3

        def decode(self, ids, skip_special_tokens=False):
            return "".join("abc"[i] for i in ids)

    grammars = Grammars(Odd(), 3)
    with pytest.raises(GrammarError, match="structured outputs are unavailable"):
        grammars.json(None)
    assert grammars.token_bytes(1) == b"b"


@pytest.mark.parametrize("kind", ["batched", "naive"])
def test_an_end_of_sequence_id_the_grammar_does_not_know_ends_the_row_where_it_may_end(
    tiny_model, tokenizer, grammars, kind
):
    """A model may end its turn with an id llguidance does not take for EOS (Llama 3's <|eot_id|>):
    once the grammar may end (a text answer of tool_choice "auto"), that id is allowed and ends the row
    with "stop"; before (no text yet) it stays masked. Without this the row ran to max_tokens."""
    other = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert other not in (tokenizer.eos_token_id, None)
    eos = [tokenizer.eos_token_id, other]
    if kind == "batched":
        runner = ModelRunner(tiny_model, num_slots=2, max_len=512, dtype=torch.float32)
        e = Engine(runner, tokenizer, eos, max_num_batched_tokens=64)
    else:
        e = NaiveEngine(tiny_model, tokenizer, eos, max_len=512)
    grammar = grammars.json_or_text({"type": "object"})
    e.start()
    try:
        c = Collector()
        c.submit(
            e, "t", PROMPTS[0], max_tokens=40, grammar=grammar, temperature=0.0, logit_bias={other: 100.0}
        )
        c.wait()
    finally:
        e.stop()
    assert c.finish("t") == FinishReason.STOP and c.tokens("t")[-1] == other
    assert 2 <= len(c.tokens("t")) < 40 and c.text("t").strip() and not c.text("t").startswith("{")
