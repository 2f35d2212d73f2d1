"""The grammar-backend layer of structured outputs (backplane.core.structured_outputs).

A "model" that samples uniformly among the tokens the grammar allows (seeded; half of the
steps restricted to closing tokens such as ``"``, ``}``, ``]`` and EOS when any is allowed,
so that JSON terminates) drives each backend; the decoded text must satisfy the
constraint. Uses the bundled demo model's tokenizer, padded to a larger model vocabulary.
"""

from __future__ import annotations

import ast
import json
import random
import re
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

import backplane
from backplane.core.structured_outputs import (
    GrammarBackend,
    InvalidSpecError,
    StructuredOutputManager,
    StructuredOutputsParams,
    UnsupportedSpecError,
    apply_bitmask,
    unpack_bitmask,
)
from backplane.core.structured_outputs.guidance_backend import GuidanceBackend, GuidanceGrammar
from backplane.core.structured_outputs.xgrammar_backend import XgrammarBackend, XgrammarGrammar

BACKENDS = ["xgrammar", "guidance", "auto"]
EXTRA_IDS = 37  # the model's vocabulary is larger than the tokenizer's
CAP = 400


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(Path(backplane.__file__).parent / "demo_model")


@pytest.fixture(scope="module")
def vocab_size(tokenizer):
    return len(tokenizer) + EXTRA_IDS


@pytest.fixture(scope="module")
def shared_backends(tokenizer, vocab_size):
    """One backend instance of each kind, shared by the managers (tokenizer tables once)."""
    return {"xgrammar": XgrammarBackend(tokenizer, vocab_size),
            "guidance": GuidanceBackend(tokenizer, vocab_size)}


def _manager(tokenizer, vocab_size, default, backends, **kw):
    factories = {name: (lambda *_a, _be=be: _be) for name, be in backends.items()}
    factories.update(kw.pop("backend_factories", {}))
    return StructuredOutputManager(tokenizer, vocab_size, default,
                                   backend_factories=factories, **kw)


@pytest.fixture(scope="module")
def managers(tokenizer, vocab_size, shared_backends):
    ms = {name: _manager(tokenizer, vocab_size, name, shared_backends) for name in BACKENDS}
    yield ms
    for m in ms.values():
        m.shutdown()


@pytest.fixture(scope="module")
def closing_ids(tokenizer, vocab_size):
    """Token ids whose text is made only of closing/separator characters, plus EOS."""
    ids = [i for i in range(len(tokenizer))
           if (text := tokenizer.decode([i])).strip()
           and set(text.strip()) <= set('"}]),') ]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    mask[tokenizer.eos_token_id] = True
    return mask


def generate(grammar, tokenizer, vocab_size, closing, seed: int) -> str:
    """Drive ``grammar`` to termination with a seeded random-but-masked sampler."""
    grammar.reset()
    rng = random.Random(seed)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    out: list[int] = []
    for _ in range(CAP):
        bitmask.zero_()
        grammar.fill_bitmask(bitmask, 0)
        allowed_mask = unpack_bitmask(bitmask, vocab_size)[0]
        allowed = allowed_mask.nonzero().flatten()
        assert allowed.numel() > 0, "the grammar allows no token"
        assert int(allowed.max()) < len(tokenizer), "an id past the tokenizer is allowed"
        pool = allowed
        if rng.random() < 0.5:
            closers = (allowed_mask & closing).nonzero().flatten()
            if closers.numel():
                pool = closers
        tok = int(pool[rng.randrange(pool.numel())])
        assert grammar.accept_tokens([tok])
        if grammar.is_terminated():
            assert tok == tokenizer.eos_token_id
            return tokenizer.decode(out)
        assert tok != tokenizer.eos_token_id
        out.append(tok)
    raise AssertionError(f"no termination after {CAP} tokens: {tokenizer.decode(out)!r}")


@pytest.fixture(scope="module")
def gen(tokenizer, vocab_size, closing_ids):
    def run(grammar, seed):
        return generate(grammar, tokenizer, vocab_size, closing_ids, seed)
    return run


# ---------------------------------------------------------------- JSON schemas

SCHEMAS = {
    "flat_required": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                             "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"},
                                                "maxItems": 2}},
            "required": ["id", "tags"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                     "maxItems": 4},
    "enum": {"type": "string", "enum": ["red", "green", "blue", "dark \"navy\""]},
    "int_enum": {"enum": [1, 2, 3, 42]},
    "integer_bounds": {"type": "integer", "minimum": -50, "maximum": 50},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "number_bounds": {"type": "number", "minimum": -2.5, "maximum": 7.25},
    "anyof": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5},
                        {"type": "string", "maxLength": 3}, {"type": "null"}]},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    "string_lengths": {"type": "string", "minLength": 2, "maxLength": 5},
    "bool_or_null": {"type": ["boolean", "null"]},
    "array_of_objects": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
        "required": ["x", "y"], "additionalProperties": False}},
    "optional_props": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "string"}},
        "required": ["a"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"version": {"const": "v1"}},
              "required": ["version"], "additionalProperties": False},
    "refs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
        "additionalProperties": False}},
        "type": "object", "properties": {"from": {"$ref": "#/$defs/point"},
                                         "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"], "additionalProperties": False},
    "matrix": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "integer"}}},
    "date_format": {"type": "string", "format": "date"},
    "multiple_of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "free_map": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "enum_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1},
    "unit_interval": {"type": "number", "minimum": 0, "maximum": 1},
    "nested_required": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"},
        "meta": {"type": "object", "properties": {
            "ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0}},
            "required": ["ok"], "additionalProperties": False}},
        "required": ["id", "meta"], "additionalProperties": False},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema(managers, gen, backend, name):
    schema = SCHEMAS[name]
    params = StructuredOutputsParams(json=schema, disable_any_whitespace=name != "nested")
    grammar = managers[backend].submit(params).result(timeout=30)
    checker = jsonschema.Draft202012Validator(schema,
                                              format_checker=jsonschema.FormatChecker())
    for seed in range(2):
        text = gen(grammar, seed)
        checker.validate(json.loads(text))


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object(managers, gen, backend):
    grammar = managers[backend].submit(StructuredOutputsParams(json_object=True)).result(30)
    for seed in range(3):
        assert isinstance(json.loads(gen(grammar, seed)), dict)


# ---------------------------------------------------------------- regex, choice, grammar

REGEXES = {
    "iso_date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "email": r"[a-z0-9._]{1,10}@[a-z]{1,8}\.(com|org|net)",
    "identifier": r"[A-Za-z_][A-Za-z0-9_]{0,15}",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(REGEXES))
def test_regex(managers, gen, backend, name):
    pattern = REGEXES[name]
    grammar = managers[backend].compile(StructuredOutputsParams(regex=pattern))
    for seed in range(3):
        text = gen(grammar, seed)
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_choice(managers, gen, backend):
    choices = ["yes", "no", "maybe later", 'say "hi"', "ünïcode"]
    grammar = managers[backend].compile(StructuredOutputsParams(choice=choices))
    seen = {gen(grammar, seed) for seed in range(8)}
    assert seen <= set(choices) and len(seen) > 1, seen


ARITH_EBNF = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= num | "(" expr ")"
num ::= [1-9] [0-9]*
"""
ARITH_LARK = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUM | "(" expr ")"
NUM: /[1-9][0-9]*/
"""


def _is_arithmetic(text: str) -> bool:
    if not re.fullmatch(r"[0-9+\-*/()]+", text):
        return False
    tree = ast.parse(text, mode="eval")
    return all(isinstance(n, ast.Expression | ast.BinOp | ast.Constant | ast.operator)
               for n in ast.walk(tree))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("syntax", ["ebnf", "lark"])
def test_arithmetic_grammar(managers, gen, backend, syntax):
    grammar = managers[backend].compile(
        StructuredOutputsParams(grammar=ARITH_EBNF if syntax == "ebnf" else ARITH_LARK))
    texts = [gen(grammar, seed) for seed in range(4)]
    assert all(_is_arithmetic(t) for t in texts), texts


@pytest.mark.parametrize("backend", BACKENDS)
def test_structural_tag_legacy(managers, gen, backend):
    tag = {"type": "structural_tag", "triggers": ["<f="],
           "structures": [{"begin": "<f=add>", "end": "</f>", "schema": {
               "type": "object", "properties": {"a": {"type": "integer"}},
               "required": ["a"], "additionalProperties": False}}]}
    grammar = managers[backend].compile(StructuredOutputsParams(structural_tag=tag))
    for seed in range(3):
        text = gen(grammar, seed)
        for body in re.findall(r"<f=add>(.*?)</f>", text, flags=re.S):
            assert isinstance(json.loads(body)["a"], int)


# ---------------------------------------------------------------- errors and fallback

INVALID = {
    "schema_type": StructuredOutputsParams(json={"type": "foo"}),
    "regex": StructuredOutputsParams(regex="(abc"),
    "regex_range": StructuredOutputsParams(regex="[z-a]"),
    "grammar_undefined_rule": StructuredOutputsParams(grammar="root ::= foo"),
    "grammar_empty": StructuredOutputsParams(grammar="  "),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_spec(managers, backend, name):
    params = INVALID[name]
    with pytest.raises(InvalidSpecError) as info:
        managers[backend].validate(params)
    assert params.kind in str(info.value)
    with pytest.raises(InvalidSpecError):
        managers[backend].submit(params).result(30)


def test_params_validation():
    with pytest.raises(ValueError, match="json, regex"):
        StructuredOutputsParams(json={"type": "integer"}, regex="a")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(InvalidSpecError, match="not valid JSON"):
        StructuredOutputsParams(json='{"type": ')
    with pytest.raises(InvalidSpecError, match="empty"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="unknown structured-output backend"):
        StructuredOutputsParams(regex="a", backend="outlines")
    assert StructuredOutputsParams(regex="a", backend="llguidance").backend == "guidance"
    a = StructuredOutputsParams(json={"type": "object", "required": ["x"]})
    b = StructuredOutputsParams(json='{"required": ["x"], "type": "object"}')
    assert a.key() == b.key() and a.key()[0] == "json"
    c = StructuredOutputsParams(json={"type": "object", "required": ["x"]},
                                disable_any_whitespace=True)
    assert c.key() != a.key()


def test_auto_falls_back_to_guidance(managers, gen):
    params = StructuredOutputsParams(regex="(?i)yes|no")  # xgrammar: no inline flags
    with pytest.raises(UnsupportedSpecError, match="xgrammar"):
        managers["xgrammar"].validate(params)
    assert managers["auto"].validate(params) == "guidance"
    grammar = managers["auto"].submit(params).result(30)
    assert isinstance(grammar, GuidanceGrammar)
    for seed in range(4):
        assert re.fullmatch("(?i)yes|no", gen(grammar, seed))
    # A backend named per request never falls back.
    with pytest.raises(UnsupportedSpecError):
        managers["auto"].submit(StructuredOutputsParams(regex="(?i)yes|no",
                                                        backend="xgrammar")).result(30)
    # Refused by both: auto reports it as unsupported.
    both = StructuredOutputsParams(json={"type": "array", "uniqueItems": True})
    with pytest.raises(UnsupportedSpecError):
        managers["auto"].validate(both)


class _RefusingBackend(GrammarBackend):
    name = "xgrammar"

    def validate(self, params):
        raise UnsupportedSpecError("refused for the test", backend=self.name)

    compile_spec = validate

    def new_grammar(self, compiled):
        raise AssertionError("unreachable")


def test_auto_fallback_with_injected_backend(tokenizer, vocab_size, shared_backends, gen):
    refusing = {"xgrammar": lambda tok, vs, eos: _RefusingBackend(tok, vs, eos)}
    backends = {"guidance": shared_backends["guidance"]}
    auto = _manager(tokenizer, vocab_size, "auto", backends, backend_factories=refusing)
    explicit = _manager(tokenizer, vocab_size, "xgrammar", backends,
                        backend_factories=refusing)
    try:
        params = StructuredOutputsParams(choice=["left", "right"])
        grammar = auto.submit(params).result(30)
        assert isinstance(grammar, GuidanceGrammar)
        assert gen(grammar, 0) in {"left", "right"}
        with pytest.raises(UnsupportedSpecError, match="refused"):
            explicit.submit(params).result(30)
    finally:
        auto.shutdown()
        explicit.shutdown()


# ---------------------------------------------------------------- cache, masks, state

@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_compiled_grammar_cache(tokenizer, vocab_size, shared_backends, backend):
    manager = _manager(tokenizer, vocab_size, backend, shared_backends)
    try:
        params = StructuredOutputsParams(json=SCHEMAS["nested_required"])
        start = time.perf_counter()
        first = manager.submit(params).result(30)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = StructuredOutputsParams(json=json.dumps(SCHEMAS["nested_required"]))
        second = manager.submit(again).result(30)
        warm = time.perf_counter() - start
        assert second.compiled is first.compiled and second is not first
        assert manager.stats == {**manager.stats, "hits": 1, "misses": 1}
        assert manager.cached(params)
        assert warm < max(cold, 0.05)
        # Independent per-request state over the shared compiled form.
        assert first.accept_tokens(tokenizer.encode('{"id"', add_special_tokens=False))
        assert second.num_processed_tokens == 0
    finally:
        manager.shutdown()


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_extra_vocab_ids_masked_and_eos_only_at_end(managers, tokenizer, vocab_size, backend):
    manager = managers[backend]
    grammar = manager.compile(StructuredOutputsParams(regex="ab+"))
    eos = tokenizer.eos_token_id
    bitmask = torch.zeros(2, manager.bitmask_width, dtype=torch.int32)
    grammar.fill_bitmask(bitmask, 1)
    allowed = unpack_bitmask(bitmask, 32 * manager.bitmask_width)[1]
    assert not allowed[len(tokenizer):].any()  # extra ids and the word's padding bits
    assert not allowed[eos] and allowed.any()
    assert not unpack_bitmask(bitmask, vocab_size)[0].any()  # other rows untouched
    assert grammar.accept_tokens(tokenizer.encode("ab", add_special_tokens=False))
    grammar.fill_bitmask(bitmask, 0)
    allowed = unpack_bitmask(bitmask, vocab_size)[0]
    assert allowed[eos] and not allowed[len(tokenizer):].any()


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_accept_reject_rollback_reset(managers, tokenizer, backend):
    manager = managers[backend]
    grammar = manager.compile(StructuredOutputsParams(choice=["hello world", "help"]))
    assert isinstance(grammar, XgrammarGrammar if backend == "xgrammar" else GuidanceGrammar)
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert grammar.validate_tokens(ids + [eos, eos]) == len(ids) + 1
    assert grammar.num_processed_tokens == 0
    assert not grammar.accept_tokens(ids[:1] + [eos])  # all or nothing
    assert grammar.num_processed_tokens == 0
    assert grammar.accept_tokens(ids)
    assert not grammar.is_terminated()
    assert grammar.accept_tokens([eos]) and grammar.is_terminated()
    grammar.rollback(1)
    assert not grammar.is_terminated()
    grammar.rollback(len(ids))
    assert grammar.num_processed_tokens == 0
    assert grammar.accept_tokens(ids) and grammar.accept_tokens([eos])
    grammar.reset()
    assert not grammar.is_terminated() and grammar.num_processed_tokens == 0
    assert grammar.accept_tokens(tokenizer.encode("help", add_special_tokens=False) + [eos])


def test_fill_bitmasks_batch(managers, tokenizer):
    manager = managers["auto"]
    g1 = manager.compile(StructuredOutputsParams(choice=["yes", "no"]))
    g2 = manager.compile(StructuredOutputsParams(regex="[0-9]+"))
    bitmask = manager.allocate_bitmask(4)
    bitmask[:] = 0
    manager.fill_bitmasks([g1, None, g2], bitmask)
    allowed = unpack_bitmask(bitmask, manager.vocab_size)
    assert allowed[1].all() and not allowed[3].any()
    assert 0 < allowed[0].sum() < 20 and 0 < allowed[2].sum() < len(tokenizer)


def _reference_apply(logits, bitmask, rows):
    out = logits.clone()
    rows = range(logits.shape[0]) if rows is None else rows
    for i, r in enumerate(rows):
        for tok in range(logits.shape[1]):
            word = tok // 32
            ok = word < bitmask.shape[1] and (int(bitmask[i, word]) >> (tok % 32)) & 1
            if not ok:
                out[r, tok] = float("-inf")
    return out


@pytest.mark.parametrize("rows", [None, [4, 0, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_matches_reference(rows, dtype):
    gen = torch.Generator().manual_seed(0)
    vocab = 300  # not a multiple of 32; one more column than the bitmask covers
    logits = torch.randn(5, vocab + 1, generator=gen).to(dtype)
    n = 5 if rows is None else len(rows)
    bitmask = torch.randint(-2**31, 2**31 - 1, (n, (vocab + 31) // 32), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    expected = _reference_apply(logits, bitmask, rows)
    out = apply_bitmask(logits, bitmask, None if rows is None else torch.tensor(rows))
    assert out is logits and torch.equal(logits, expected)
    assert StructuredOutputManager.apply_bitmask is apply_bitmask


def test_runner_masks_through_the_platforms_apply_token_bitmask(monkeypatch):
    """The sampler masks with Platform.apply_token_bitmask, so a plugin's kernel is used."""
    from backplane import LLM, SamplingParams
    from backplane.platforms.cpu.platform import CpuPlatform
    from backplane.plugins_sdk import Platform

    calls = []

    def spy(self, logits, bitmask, rows):
        # rows None: the bitmask covers every row of the step.
        calls.append((tuple(bitmask.shape), None if rows is None else rows.tolist()))
        return Platform.apply_token_bitmask(self, logits, bitmask, rows)

    monkeypatch.setattr(CpuPlatform, "apply_token_bitmask", spy)
    llm = LLM(model=str(Path(backplane.__file__).parent / "demo_model"), device="cpu",
              max_model_len=256, num_kv_blocks=64)
    params = [SamplingParams(max_tokens=4, temperature=0.0),
              SamplingParams(max_tokens=4, temperature=0.0,
                             structured_outputs={"choice": ["alpha", "beta"]})]
    outs = llm.generate(["Hello", "Pick one:"], params, use_tqdm=False)
    assert outs[1].outputs[0].text in ("alpha", "beta")
    # One constrained row per step: indexed while the other request runs, else alone.
    assert calls and all(shape[0] == 1 for shape, _ in calls)
    assert all(rows is None or len(rows) == 1 for _, rows in calls)
