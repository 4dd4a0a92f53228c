import json
from pathlib import Path

import pytest

from loom.bench.loader import DATA_DIR, SHAREGPT_FILE, WorkloadSpec, load_workload, read_length_pairs
from loom.bench.synthetic import LengthSpec
from loom.bench.traces import load_azure, load_burstgpt, load_mooncake, load_sharegpt

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:05.5000000,300,20
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,0
2023-11-16 18:18:03.9799600,12,1
"""

MOONCAKE = "\n".join(
    json.dumps(r)
    for r in [
        {"timestamp": 1500, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 500, "input_length": 1024, "output_length": 9, "hash_ids": [0, 2]},
        {"timestamp": 2000, "input_length": 10, "output_length": 3, "hash_ids": [3]},
    ]
)

BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,0,1087,Conversation log
118,GPT-4,417,276,693,API log
130,ChatGPT,0,10,10,API log
200,ChatGPT,1000,50,1050,API log
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure(tmp_path):
    w = load_azure(write(tmp_path, "a.csv", AZURE))
    # the 0-output row is skipped; times relative to the earliest row, sorted
    assert [(round(r.arrival, 4), r.input_len, r.output_len) for r in w] == [
        (0.0, 4808, 10),
        (1.52, 300, 20),
        (60.0, 12, 1),
    ]


def test_azure_errors(tmp_path):
    with pytest.raises(ValueError, match="missing CSV column"):
        load_azure(write(tmp_path, "a.csv", "TIME,ContextTokens,GeneratedTokens\n1,2,3\n"))
    with pytest.raises(ValueError, match="a.csv:2: bad TIMESTAMP"):
        load_azure(write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,2,3\n"))
    with pytest.raises(ValueError, match="ContextTokens 'many'"):
        load_azure(write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05,many,3\n"))


def test_real_azure_file_head():
    path = DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
    w = load_azure(path)
    assert len(w) > 8000 and w[0].arrival == 0.0
    assert all(a.arrival <= b.arrival for a, b in zip(w, w[1:]))


def test_mooncake(tmp_path):
    w = load_mooncake(write(tmp_path, "m.jsonl", MOONCAKE + "\n\n"))
    assert [(r.arrival, r.input_len, r.output_len, r.hash_ids) for r in w] == [
        (0.0, 1024, 9, (0, 2)),
        (1.0, 700, 5, (0, 1)),
        (1.5, 10, 3, (3,)),
    ]
    assert all(r.block_tokens == 512 for r in w)


def test_mooncake_errors(tmp_path):
    with pytest.raises(ValueError, match="m.jsonl:1: bad Mooncake record"):
        load_mooncake(write(tmp_path, "m.jsonl", '{"timestamp": 0}\n'))
    with pytest.raises(ValueError, match="fewer than input_length"):
        load_mooncake(write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}\n'))


def test_burstgpt_skips_failures_and_filters(tmp_path):
    p = write(tmp_path, "b.csv", BURSTGPT)
    assert [(r.arrival, r.input_len, r.output_len) for r in load_burstgpt(p)] == [
        (0.0, 472, 18),
        (113.0, 417, 276),
        (195.0, 1000, 50),
    ]
    assert [r.input_len for r in load_burstgpt(p, model="ChatGPT")] == [472, 1000]
    assert [r.input_len for r in load_burstgpt(p, log_type="API log")] == [417, 1000]


def test_sharegpt_uses_answer_length_or_default(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "one two three"}, {"from": "gpt", "value": "four five"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "six seven"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "   "}]},
    ]
    p = write(tmp_path, "s.json", json.dumps(data))

    def words(text: str) -> int:
        return len(text.split())

    w = load_sharegpt(p, words, default_output_len=9)
    assert [(r.prompt, r.input_len, r.output_len) for r in w] == [("one two three", 3, 2), ("six seven", 2, 9)]
    with pytest.raises(ValueError, match="entry 1 has no answer turn"):
        load_sharegpt(p, words)


def test_sharegpt_errors(tmp_path):
    with pytest.raises(ValueError, match="not JSON"):
        load_sharegpt(write(tmp_path, "s.json", "{"), len)
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(write(tmp_path, "s.json", "{}"), len)


def test_workload_spec_parsing():
    assert WorkloadSpec.parse_kind("azure:/x/y.csv") == ("azure", "/x/y.csv")
    assert WorkloadSpec.parse_kind("synthetic") == ("synthetic", None)
    assert WorkloadSpec.parse_kind("sharegpt") == ("sharegpt", str(SHAREGPT_FILE))
    with pytest.raises(ValueError, match="unknown workload 'csv'"):
        WorkloadSpec.parse_kind("csv:/x")
    with pytest.raises(ValueError, match="needs a file"):
        WorkloadSpec("mooncake")
    with pytest.raises(ValueError, match="burstiness needs the gamma"):
        WorkloadSpec("synthetic", burstiness=0.5)


def test_load_workload_dispatch(tmp_path):
    p = write(tmp_path, "b.csv", BURSTGPT)
    assert len(load_workload(WorkloadSpec("burstgpt", str(p), burstgpt_model="GPT-4"), len)) == 1
    syn = load_workload(WorkloadSpec("synthetic", num_requests=5, rate=2.0, lengths=LengthSpec("fixed", 3, 4)), len)
    assert len(syn) == 5 and {(r.input_len, r.output_len) for r in syn} == {(3, 4)}
    assert read_length_pairs("burstgpt", str(p)) == ((472, 18), (417, 276), (1000, 50))


def test_load_workload_sharegpt_subsets_and_spaces_arrivals(tmp_path):
    data = [{"conversations": [{"from": "human", "value": f"prompt number {i}"}]} for i in range(10)]
    p = write(tmp_path, "s.json", json.dumps(data))
    spec = WorkloadSpec("sharegpt", str(p), num_requests=4, rate=2.0, lengths=LengthSpec(output_len=7))
    w = load_workload(spec, lambda t: len(t.split()))
    assert len(w) == 4 and len({r.prompt for r in w}) == 4
    assert w[0].arrival == 0.0 and all(a.arrival < b.arrival for a, b in zip(w, w[1:]))
    assert {(r.input_len, r.output_len) for r in w} == {(3, 7)}
