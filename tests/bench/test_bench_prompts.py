import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loom.bench.loader import SONNET_FILE
from loom.bench.prompts import PromptBuilder, read_corpus
from loom.bench.tokenizer import ApproxTokenizer, LocalTokenizer, resolve_tokenizer
from loom.bench.workload import TraceRequest


@pytest.fixture(scope="module")
def sonnet() -> str:
    return SONNET_FILE.read_text()


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, sonnet):
    """A byte-level BPE tokenizer trained on the sonnets: real merges, so text
    windows can re-tokenize to other lengths at their edges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([sonnet], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_local_tokenizer_roundtrip(bpe_path):
    tok = LocalTokenizer(bpe_path.parent)  # a directory holding tokenizer.json works too
    text = "Shall I compare thee to a summer's day?"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="no tokenizer.json"):
        LocalTokenizer(bpe_path.parent / "missing")


def test_approx_tokenizer():
    tok = ApproxTokenizer(4)
    ids = tok.encode("abcdefghij")
    assert len(ids) == 3 and tok.decode(ids) == "abcdefghij"
    assert tok.encode("abcd") == [ids[0]]  # same piece, same id
    with pytest.raises(ValueError):
        ApproxTokenizer(0.5)


def test_resolve_tokenizer_falls_back_with_warning(caplog, bpe_path):
    assert isinstance(resolve_tokenizer(str(bpe_path), None, None), LocalTokenizer)
    assert isinstance(resolve_tokenizer(None, None, None), ApproxTokenizer)
    assert "estimated at 4 characters per token" in caplog.text


def test_read_corpus_sharegpt_and_text(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "first prompt"}, {"from": "gpt", "value": "an answer"}]},
        {"conversations": [{"from": "human", "value": "second prompt"}]},
    ]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    assert read_corpus(p) == "first prompt\n\nsecond prompt"
    assert read_corpus(SONNET_FILE).startswith("Shall I compare thee")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        read_corpus(tmp_path / "empty.txt")


@pytest.mark.parametrize("n", [1, 7, 64, 300, 2500])  # 2500 wraps around the corpus
def test_plain_prompts_have_exact_length(bpe_path, sonnet, n):
    tok = LocalTokenizer(bpe_path)
    b = PromptBuilder(tok, sonnet, seed=1)
    (p,) = b.prepare([TraceRequest(arrival=0.5, input_len=n, output_len=3)])
    assert p.prompt_len == n and len(tok.encode(p.prompt)) == n
    assert (p.arrival, p.max_tokens, p.index) == (0.5, 3, 0)


def test_plain_prompts_do_not_share_prefixes(bpe_path, sonnet):
    tok = LocalTokenizer(bpe_path)
    prepared = PromptBuilder(tok, sonnet, seed=0).prepare([TraceRequest(0, 50, 1) for _ in range(40)])
    firsts = {tuple(tok.encode(p.prompt)[:4]) for p in prepared}
    assert len(firsts) == 40


def test_hash_ids_share_exactly_the_trace_prefixes(bpe_path, sonnet):
    tok = LocalTokenizer(bpe_path)
    b = PromptBuilder(tok, sonnet)
    w = [
        TraceRequest(0, 90, 1, hash_ids=(5, 6, 7), block_tokens=32),
        TraceRequest(0, 70, 1, hash_ids=(5, 6, 9), block_tokens=32),
        TraceRequest(0, 64, 1, hash_ids=(8, 6), block_tokens=32),
    ]
    a, c, d = (tok.encode(p.prompt) for p in b.prepare(w))
    assert (len(a), len(c), len(d)) == (90, 70, 64)
    # blocks 5 and 6 are shared; token merges may differ only right at the seam
    common = next(i for i, (x, y) in enumerate(zip(a, c)) if x != y)
    assert 60 <= common <= 66
    assert a[:3] != d[:3]  # a different first block: no shared prefix


def test_block_offsets_are_stable_and_spread(bpe_path, sonnet):
    b = PromptBuilder(LocalTokenizer(bpe_path), sonnet)
    assert b.block_offset(12, 64) == b.block_offset(12, 64)
    offsets = {b.block_offset(h, 512) for h in range(200)}  # a short corpus: ids wrap around
    assert len(offsets) > 150


def test_real_text_prompts_pass_through(bpe_path, sonnet):
    b = PromptBuilder(LocalTokenizer(bpe_path), sonnet)
    (p,) = b.prepare([TraceRequest(0, 4, 9, prompt="a real user prompt")])
    assert (p.prompt, p.prompt_len, p.max_tokens) == ("a real user prompt", 4, 9)


def test_corpus_must_have_tokens():
    with pytest.raises(ValueError, match="fewer than 2"):
        PromptBuilder(ApproxTokenizer(), "abc")
