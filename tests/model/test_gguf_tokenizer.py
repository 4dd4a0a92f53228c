"""tokenizer.json rebuilt from GGUF metadata: behaviour on the default model, SentencePiece vocabularies,
errors, and (slow) parity with the tokenizer transformers builds from the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer

from loom.model.files import default_model_path
from loom.model.gguf_meta import GGUFError, open_gguf
from loom.model.gguf_tokenizer import build_tokenizer, write_tokenizer
from tests.model.tokenizer_texts import varied_texts


@pytest.fixture(scope="module")
def default_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    path = default_model_path()
    write_tokenizer(open_gguf(path), "llama", path, out)
    return out


def test_default_model_tokenizer_behaviour(default_tokenizer: Path) -> None:
    tok = Tokenizer.from_file(str(default_tokenizer / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=True)
    assert chat.ids[0] == 1 and 2 in chat.ids  # control tokens stay whole; no BOS is added
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # smollm splits digits one by one
    assert tok.encode("Hello world").tokens == ["Hello", "Ġworld"]
    for text in varied_texts(50):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text

    cfg = json.loads((default_tokenizer / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert cfg["chat_template"].startswith("{% for message in messages %}")


def _sentencepiece_meta(add_bos: bool = True) -> dict:
    pieces = ["<unk>", "<s>", "</s>", "<ctrl>", "\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "\u2581abc", "bc"]
    tokens = pieces + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3] + [1] * (len(pieces) - 4) + [6] * 256
    scores = [0.0] * 4 + [-float(i) for i in range(len(pieces) - 4)] + [0.0] * 256
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_id": 1,
        "eos_id": 2,
        "unk_id": 0,
        "add_bos": add_bos,
        "add_space_prefix": True,
    }


def test_sentencepiece_vocabulary(tmp_path: Path) -> None:
    tok = build_tokenizer(_sentencepiece_meta(), "llama", tmp_path / "x.gguf")
    enc = tok.encode("abc ab<ctrl>é")
    assert enc.tokens == ["<s>", "\u2581abc", "\u2581ab", "<ctrl>", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids) == "abc ab\u00e9"  # special tokens skipped, bytes fused back into UTF-8
    plain = build_tokenizer(_sentencepiece_meta(add_bos=False), "llama", tmp_path / "x.gguf")
    assert plain.encode("bc").tokens == ["\u2581", "bc"]  # neither "▁b" nor "▁bc" is a token


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"model": "bert"}, "unsupported tokenizer.ggml.model 'bert'"),
        ({"model": "gpt2", "pre": "made-up"}, "unsupported tokenizer.ggml.pre 'made-up'"),
        ({"model": "gpt2", "merges": ["a b c"]}, "malformed merge"),
        ({"model": "gpt2", "merges": []}, "without tokenizer.ggml.merges"),
    ],
)
def test_unsupported_tokenizers_are_rejected(change: dict, problem: str, tmp_path: Path) -> None:
    meta = _sentencepiece_meta() | {"merges": ["a b"], "pre": "gpt2"} | change
    with pytest.raises(GGUFError, match=problem) as info:
        build_tokenizer(meta, "llama", tmp_path / "x.gguf")
    assert str(tmp_path / "x.gguf") in str(info.value)


def _transformers_tokenizer(gguf_path: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).backend_tokenizer


def _assert_same_ids(ours: Tokenizer, theirs: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        for special in (False, True):
            assert (
                ours.encode(text, add_special_tokens=special).ids == theirs.encode(text, add_special_tokens=special).ids
            ), (text, special)


@pytest.mark.slow
def test_parity_with_transformers_default_model(default_tokenizer: Path) -> None:
    """Same ids as transformers' GGUF tokenizer, except that transformers ignores the ``smollm``
    pre-tokenizer (llama.cpp and SmolLM2's own tokenizer.json split digits one by one): with that
    split put back into transformers' tokenizer, every string matches."""
    from tokenizers import pre_tokenizers

    ours = Tokenizer.from_file(str(default_tokenizer / "tokenizer.json"))
    theirs = _transformers_tokenizer(default_model_path())
    texts = varied_texts()
    digit_free = [t for t in texts if not any(c.isdigit() for c in t)]
    assert len(digit_free) > 150
    _assert_same_ids(ours, theirs, digit_free)
    theirs.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), theirs.pre_tokenizer]
    )
    _assert_same_ids(ours, theirs, texts)


@pytest.mark.slow
def test_parity_with_transformers_sentencepiece(tmp_path: Path) -> None:
    """A small SentencePiece vocabulary written as GGUF: transformers agrees on every string."""
    meta = _sentencepiece_meta()
    path = tmp_path / "spm.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(meta["tokens"])
    writer.add_token_scores(meta["scores"])
    writer.add_token_types(meta["token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    write_tokenizer(open_gguf(path), "llama", path, tmp_path)
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["abc ab", " abc", "bcab  abc", "ab\u00e9\U0001f600c", "<ctrl>a b c<s>", "", "   "]
    _assert_same_ids(ours, _transformers_tokenizer(path), texts)
