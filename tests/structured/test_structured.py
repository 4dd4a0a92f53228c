"""Structured output: constraint validation, compiling and caching, the per-sample grammar state
(accept, rollback, masks after draft tokens), the bitmask on the logits, and constrained
generation end to end on the tiny random model (only the grammar can make its output valid)."""

from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
import torch

from loom.engine import LLM, Engine, engine_config
from loom.sampling import SamplingParams
from loom.spec import Draft, Proposer
from loom.structured import GrammarCompiler, GrammarError, StructuredOutputs, apply_token_bitmask, new_bitmask
from loom.structured.params import MAX_CHOICES, MAX_GRAMMAR_CHARS

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def compiler(llm):
    return llm.engine.grammars


def allowed(compiler: GrammarCompiler, state) -> set[int]:
    mask = new_bitmask(1, compiler.vocab_size)
    state.fill_bitmask(mask, 0)
    logits = torch.zeros(1, compiler.vocab_size)
    apply_token_bitmask(logits, [0], mask)
    return set(torch.isfinite(logits[0]).nonzero().view(-1).tolist())


# -- the constraint ---------------------------------------------------------------------------
def test_exactly_one_constraint_is_required():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])


def test_schema_text_and_dict_are_the_same_constraint():
    assert StructuredOutputs(json=PERSON) == StructuredOutputs(json=json.dumps(PERSON, indent=2))
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputs(json="{nope")
    with pytest.raises(ValueError, match="JSON schema"):
        StructuredOutputs(json="[1, 2]")


def test_hostile_sizes_are_capped():
    with pytest.raises(ValueError, match=f"at most {MAX_CHOICES}"):
        StructuredOutputs(choice=[str(i) for i in range(MAX_CHOICES + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_GRAMMAR_CHARS}"):
        StructuredOutputs(regex="a" * (MAX_GRAMMAR_CHARS + 1))


def test_sampling_params_take_a_dict_and_reject_min_tokens():
    p = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert p.structured_outputs == StructuredOutputs(regex="[0-9]+")
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(structured_outputs={"regex": "a"}, min_tokens=2)
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"yaml": "a"})


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputs(json={"type": "nonsense"}), "invalid json constraint"),
    (StructuredOutputs(regex="(["), "invalid regex constraint"),
    (StructuredOutputs(grammar="root ::= ("), "invalid grammar constraint"),
])
def test_bad_constraints_raise_grammar_errors(compiler, spec, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.compile(spec)


def test_compiled_grammars_are_cached(compiler):
    spec = StructuredOutputs(json=PERSON)
    compiler.compile(spec)
    key = (spec.kind, spec.source)
    seconds = compiler.compile_seconds[key]
    compiler.compile(StructuredOutputs(json=json.dumps(PERSON)))  # the same schema, as text
    assert compiler.compile_seconds[key] == seconds


# -- the state --------------------------------------------------------------------------------
def test_state_accepts_rolls_back_and_terminates(llm, compiler):
    tok = llm.tokenizer
    state = compiler.new_state(StructuredOutputs(choice=["yes", "no"]))
    start = allowed(compiler, state)
    yes = tok.encode("yes", add_special_tokens=False)
    assert yes[0] in start and not state.is_terminated
    for t in yes:
        assert state.accept(t)
    assert state.is_terminated
    state.rollback(len(yes))
    assert allowed(compiler, state) == start and not state.is_terminated


def test_masks_after_drafts_leave_the_state_unchanged(llm, compiler):
    tok = llm.tokenizer
    state = compiler.new_state(StructuredOutputs(regex="[0-9]{2}x"))
    digits = tok.encode("12", add_special_tokens=False)
    start = allowed(compiler, state)
    mask = new_bitmask(1 + len(digits) + 1, compiler.vocab_size)
    bad_draft = tok.encode("z", add_special_tokens=False)[0]
    state.fill_bitmask(mask, 0, [*digits, bad_draft])
    assert allowed(compiler, state) == start  # rolled back
    check = compiler.new_state(StructuredOutputs(regex="[0-9]{2}x"))
    for t in digits:
        check.accept(t)
    expected = new_bitmask(1, compiler.vocab_size)
    check.fill_bitmask(expected, 0)
    assert torch.equal(mask[len(digits)], expected[0])
    assert bool((mask[-1] == -1).all())  # after the rejected draft: never kept, so anything


def test_bitmask_leaves_other_rows_untouched():
    logits = torch.randn(3, 70)
    before = logits.clone()
    mask = new_bitmask(1, 70)
    mask[0, 0] = 0b101  # tokens 0 and 2
    mask[0, 2] = 1 << 5  # token 69
    apply_token_bitmask(logits, [1], mask)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.isfinite(logits[1]).nonzero().view(-1).tolist() == [0, 2, 69]
    assert torch.equal(logits[1, [0, 2, 69]], before[1, [0, 2, 69]])


# -- generation -------------------------------------------------------------------------------
def texts(llm, spec, n=1, **kwargs):
    params = SamplingParams(n=n, max_tokens=kwargs.pop("max_tokens", 80), structured_outputs=spec, **kwargs)
    return [c for o in llm.generate(["Hello", "Write JSON:"], params, use_tqdm=False) for c in o.outputs]


def test_json_schema_output_validates(llm):
    validator = jsonschema_rs.validator_for(PERSON)
    outs = texts(llm, StructuredOutputs(json=PERSON), n=3, temperature=1.0, seed=5)
    for c in outs:
        assert c.finish_reason == "stop"
        validator.validate(json.loads(c.text))
    assert len({c.text for c in outs}) > 1  # sampling still samples


def test_json_object_regex_choice_and_grammar(llm):
    objects = texts(llm, StructuredOutputs(json_object=True), n=4, temperature=1.0, seed=1, max_tokens=120)
    complete = [c for c in objects if c.finish_reason == "stop"]  # a random model may write one long string
    assert complete and all(isinstance(json.loads(c.text), dict) for c in complete)
    for c in texts(llm, StructuredOutputs(regex=r"[a-c]{3}-\d\d"), temperature=0):
        assert re.fullmatch(r"[a-c]{3}-\d\d", c.text) and c.finish_reason == "stop"
    for c in texts(llm, StructuredOutputs(choice=["red", "green", "blue"]), temperature=1.0, seed=2):
        assert c.text in ("red", "green", "blue")
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for c in texts(llm, StructuredOutputs(grammar=gbnf), temperature=1.0, seed=3, max_tokens=200):
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", c.text), c.text


def test_a_constrained_request_cut_by_max_tokens_ends_with_length(llm):
    for c in texts(llm, StructuredOutputs(json=PERSON), max_tokens=4, temperature=0):
        assert c.finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(c.text)


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["Hello"], free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputs(regex=r"[a-z]{4}\d"))
    eng = llm.engine
    eng.add_request("free", "Hello", free)
    eng.add_request("json", "Hello", constrained)
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert finals["free"].outputs[0].token_ids == alone  # its row untouched
    assert re.fullmatch(r"[a-z]{4}\d", finals["json"].outputs[0].text)


def test_drafts_are_verified_against_the_grammar(model_dir, llm):
    """Draft tokens (some the grammar forbids) change neither the constrained output nor the
    grammar state: accepted drafts advance it, rejected ones never enter it."""
    spec = StructuredOutputs(regex=r"[a-z]{6}-[0-9]{6}")
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=spec)
    plain = llm.generate(["Hello"], params, use_tqdm=False)[0].outputs[0]
    expected = plain.token_ids
    assert plain.finish_reason == "stop" and len(expected) > 4

    class Replay(Proposer):
        name = "replay"
        proposed = 0

        def propose(self, requests, ks):
            drafts = []
            for r, k in zip(requests, ks):
                future = expected[len(r.output_token_ids):][:k]
                drafts.append(Draft(tuple(t if i % 2 == 0 else 5 for i, t in enumerate(future))))
                Replay.proposed += len(future)
            return drafts

    engine = Engine(engine_config(model_dir, dtype="float32", block_size=4, speculative_k="4"), proposer=Replay())
    engine.add_request("r", "Hello", params)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert Replay.proposed > 0
    assert final.outputs[0].token_ids == expected and final.outputs[0].finish_reason == "stop"


def test_logit_bias(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={321: 100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [321] * 5
    banned = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    first = banned.outputs[0].token_ids[0]
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={first: -100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != first
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(["Hello"], SamplingParams(logit_bias={10**7: 1}), use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})


def test_one_of_is_enforced_as_any_of(llm):
    schema = {"oneOf": [{"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "maximum": 9}},
                         "required": ["kind", "lives"], "additionalProperties": False},
                        {"type": "object", "properties": {"kind": {"const": "dog"}}, "required": ["kind"],
                         "additionalProperties": False}]}
    validator = jsonschema_rs.validator_for(schema)
    outs = texts(llm, StructuredOutputs(json=schema), n=3, temperature=1.0, seed=9)
    for c in outs:
        assert c.finish_reason == "stop"
        validator.validate(json.loads(c.text))
