"""`loom bench structured`: the benchmark's core end to end on the tiny random model (report
structure, counts that add up), the validity check (invalid and cut output never counts as
valid), and the OpenAI-spec extraction (self-contained schemas the compiler takes)."""

from __future__ import annotations

import json

import pytest

from loom.bench import structured as sb
from loom.cli import main
from loom.engine import Engine, engine_config

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(engine_config(str(tiny_model("llama")), dtype="float32", max_num_seqs=4))


def test_core_reports_compile_validity_and_overhead(engine):
    hand = dict(list(sb.HAND_WRITTEN.items())[:3])
    r = sb.run_benchmark(engine, openai={}, hand=hand, num_openai=0, max_schema_chars=2000, num_samples=1, max_tokens=48,
                         batch_sizes=[1, 2], decode_steps=3, rounds=1, log=lambda *_: None)
    assert r["llguidance_tokenizer_s"] > 0
    c = r["compile"]["hand"]
    assert (c["schemas"], c["compiled"], c["skipped"]) == (3, 3, 0) and c["compile_ms"]["max"] > 0
    assert r["compile"]["openai"]["schemas"] == 0
    assert [s["name"] for s in r["per_schema"]] == list(hand)
    for s in r["per_schema"]:
        assert s["compile_ms"] > 0 and len(s["outputs"]) == 2
        for o in s["outputs"]:
            assert o["status"] in (sb.VALID, sb.LENGTH)  # the grammar makes every finished document valid
            assert (o["status"] == sb.LENGTH) == (o["finish_reason"] == "length")
            assert o["tokens"] <= 48
    v = r["validity"]
    assert v["outputs"] == 6 and v["valid"] + v["length_cut"] == 6 and v["finished_stop"] == v["valid"]
    assert v["validity"] in (None, 1.0)
    assert [o["batch"] for o in r["overhead"]] == [1, 2]
    for o in r["overhead"]:
        assert len(o["schemas"]) == o["batch"] and 0 < o["steps"] <= 3
        assert o["free_ms_per_step"] > 0 and o["constrained_ms_per_step"] > 0 and o["overhead_pct"] is not None
        assert o["constrained"]["mask_fill_ms"] > 0 and o["free"]["forward_ms"] > 0
    json.dumps(r)  # all plain data
    assert not engine.has_unfinished_requests()


def test_invalid_and_cut_outputs_are_not_valid():
    check = sb.validator(PERSON)
    assert sb.check_output(check, '{"name": "Ann", "age": 3}', "stop") == (sb.VALID, None)
    assert sb.check_output(check, '{"name": "Ann", "age": -3}', "stop")[0] == sb.INVALID_SCHEMA
    assert sb.check_output(check, '{"name": "Annabelle the Great", "age": 3}', "stop")[0] == sb.INVALID_SCHEMA
    assert sb.check_output(check, '{"name": "Ann"}', "stop")[0] == sb.INVALID_SCHEMA
    assert sb.check_output(check, '{"name": "Ann", "age": 3', "stop")[0] == sb.INVALID_JSON
    assert sb.check_output(check, '{"name": "Ann", "age": 3} trailing', "stop")[0] == sb.INVALID_JSON
    # Cut by max_tokens: never valid, even when the text happens to be a valid document.
    assert sb.check_output(check, '{"name": "Ann", "age": 3}', "length")[0] == sb.LENGTH
    assert sb.check_output(check, '{"name": "Ann", "age": 3}', "abort")[0] == sb.OTHER
    formats = sb.validator(sb.HAND_WRITTEN["string_formats"])
    doc = {"email": "a@b.co", "date": "2024-02-30x", "created_at": "2024-01-01T00:00:00Z",
           "id": "123e4567-e89b-12d3-a456-426614174000"}
    assert sb.check_output(formats, json.dumps(doc), "stop")[0] == sb.INVALID_SCHEMA  # formats are checked
    summary = sb.validity_summary([{"outputs": [
        {"status": sb.VALID, "finish_reason": "stop", "tokens": 5},
        {"status": sb.INVALID_SCHEMA, "finish_reason": "stop", "tokens": 5},
        {"status": sb.LENGTH, "finish_reason": "length", "tokens": 9}]}])
    assert (summary["valid"], summary["finished_stop"], summary["length_cut"], summary["validity"]) == (1, 2, 1, 0.5)


def test_component_refs_become_defs():
    components = {
        "Node": {"type": "object", "properties": {"deprecated": {"type": "boolean"},  # a property, not the keyword
                                                  "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                                                  "tag": {"$ref": "#/components/schemas/Tag"}},
                 "discriminator": {"propertyName": "x"}, "x-oaiMeta": {}, "example": {}},
        "Tag": {"type": "string", "enum": ["a", "b"], "deprecated": True, "nullable": True},
    }
    s = sb.resolve_component(components, "Node")
    assert set(s["$defs"]) == {"Node", "Tag"}
    assert s["properties"]["kids"]["items"] == {"$ref": "#/$defs/Node"}
    assert "deprecated" in s["properties"]
    assert not {"discriminator", "x-oaiMeta", "example"} & set(s)
    assert s["$defs"]["Tag"] == {"type": "string", "enum": ["a", "b"]}
    assert sb.validator(s).is_valid({"kids": [{"tag": "a"}], "deprecated": False})


def test_openai_spec_yields_30_compilable_self_contained_schemas(engine):
    if not sb.OPENAPI_FILE.is_file():
        pytest.skip(f"no OpenAI spec at {sb.OPENAPI_FILE}")
    schemas = sb.load_openai_schemas(sb.OPENAPI_FILE)
    assert len(schemas) > 1000
    # The selection is evenly spaced over the names; compile an even spread of candidates.
    names = sorted(schemas)[:: len(schemas) // 120]
    _, rows = sb.compile_scan(engine, {n: ("openai", schemas[n]) for n in names})
    picked = sb.select_openai(rows, 30, 2000)
    assert len(picked) == 30
    for name in picked:
        text = json.dumps(schemas[name])
        assert "#/components/" not in text
        sb.validator(schemas[name])  # every $ref resolves inside the schema
    assert any(not r["ok"] for r in rows)  # and rejections are reported, with a reason
    assert all(r["reason"] for r in rows if not r["ok"])


def test_cli_writes_json(tiny_model, tmp_path):
    out = tmp_path / "s.json"
    rc = main(["bench", "structured", "--model", str(tiny_model("llama")), "--dtype", "float32", "--num-hand-written", "2",
               "--num-openai-schemas", "0", "--num-samples", "0", "--max-tokens", "24", "--batch-sizes", "1",
               "--decode-steps", "2", "--rounds", "1", "--no-progress", "--output", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["config"]["batch_sizes"] == [1] and r["validity"]["outputs"] == 2 and len(r["overhead"]) == 1
