"""tokenizer.json rebuilt from GGUF metadata: behaviour on the default model, SentencePiece vocabularies,
errors, and parity with the tokenizer transformers builds from the same file (fast: transformers' own GGUF
tokenizer converter on the default model and on every supported byte-level pre-tokenizer name; slow: the
full ``AutoTokenizer.from_pretrained(..., gguf_file=...)``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFWriter
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from loom.model.files import default_model_path
from loom.model.gguf_meta import GGUFError, open_gguf
from loom.model.gguf_tokenizer import SUPPORTED_PRE, build_tokenizer, write_tokenizer
from tests.model.tokenizer_texts import NUMBERED_LIST, varied_texts, whitespace_digit_texts


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
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # the vocabulary has no multi-digit token
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
    """Same ids as transformers' full GGUF tokenizer loading path on every test string (this also
    vouches for the fast tests below, which call transformers' converter directly)."""
    ours = Tokenizer.from_file(str(default_tokenizer / "tokenizer.json"))
    theirs = _transformers_tokenizer(default_model_path())
    _assert_same_ids(ours, theirs, varied_texts() + whitespace_digit_texts())


# -- fast parity: transformers' GGUF tokenizer converter, without AutoTokenizer's slow loading ---------


def _transformers_backend(architecture: str, tokenizer_dict: dict) -> Tokenizer:
    """The backend tokenizer transformers builds from a GGUF's tokenizer fields (under its own key
    names); the converter ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` runs."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend


@pytest.fixture(scope="module")
def transformers_default() -> Tokenizer:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(default_model_path()))
    assert tokenizer_dict["pre_tokenizer_type"] == "smollm"
    return _transformers_backend(architecture, tokenizer_dict)


def test_default_model_matches_transformers(default_tokenizer: Path, transformers_default: Tokenizer) -> None:
    """Whitespace runs before digits, letters, punctuation and the end of text, digit runs, and varied
    strings: the same ids as transformers. GPT-2's split runs on the whole text, so in the numbered list
    the blank line before "1." is two "\n" tokens (198, 198), not one "\n\n" (1116)."""
    ours = Tokenizer.from_file(str(default_tokenizer / "tokenizer.json"))
    _assert_same_ids(ours, transformers_default, whitespace_digit_texts() + varied_texts())
    ids = ours.encode(NUMBERED_LIST).ids
    colon, newline, one, dot = 42, 198, 33, 30
    assert ids[5:10] == [colon, newline, newline, one, dot], ours.encode(NUMBERED_LIST).tokens
    assert ours.encode("a\n\n").ids == [81, 1116]  # at the end of the text the run stays whole


def test_default_vocabulary_has_no_digit_merges(default_tokenizer: Path) -> None:
    """Why the default model needs no digit split of its own: no merge joins a digit to anything, so
    digits come out one by one from GPT-2's split as they did from the model's digit-by-digit one."""
    model = json.loads((default_tokenizer / "tokenizer.json").read_text())["model"]
    digits = set("0123456789")
    assert not [t for t in model["vocab"] if len(t) > 1 and digits & set(t)]
    assert not [m for m in model["merges"] if digits & set("".join(m))]
    assert len(model["merges"]) > 40000 and digits <= set(model["vocab"])


# Deliberate differences from transformers (see loom/model/gguf_tokenizer.py): "stablelm2" splits like
# "qwen2" (transformers has no entry for it and falls back to GPT-2's regex), and Llama-3-style names
# keep a word whole when it is a token (BPE ignore_merges, which transformers never sets).
_SAME_SPLIT_AS = {"stablelm2": "qwen2"}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_UNREACHABLE = "qzxw"  # a vocabulary token that no merge builds


@pytest.fixture(scope="module")
def byte_level_vocab() -> dict:
    """A small byte-level BPE vocabulary (GGUF tokenizer fields, loom's names) learned with GPT-2's split,
    so it holds merges of digits, whitespace runs and letters: any difference in how a pre-tokenizer
    cuts those shows up in the ids. One control token, and one token no merge reaches."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = whitespace_digit_texts() + varied_texts()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(texts * 3, trainer)
    spec = json.loads(trained.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get) + [_UNREACHABLE, "<|endoftext|>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    assert _UNREACHABLE not in spec["vocab"]
    return {
        "model": "gpt2",
        "tokens": tokens,
        "merges": merges,
        "token_type": [1] * (len(tokens) - 1) + [3],
        "eos_id": len(tokens) - 1,
    }


def _transformers_byte_level(vocab: dict, pre: str) -> Tokenizer:
    fields = {"tokenizer_type": "gpt2", "pre_tokenizer_type": pre}
    fields |= {k: vocab[k] for k in ("tokens", "merges", "token_type")}
    return _transformers_backend("llama", fields)


_PRE_TEXTS = whitespace_digit_texts() + varied_texts(100) + [f"x {_UNREACHABLE} {_UNREACHABLE}s 12<|endoftext|>"]


@pytest.mark.parametrize("pre", SUPPORTED_PRE)
def test_byte_level_pre_types_match_transformers(byte_level_vocab: dict, pre: str, tmp_path: Path) -> None:
    ours = build_tokenizer(byte_level_vocab | {"pre": pre}, "llama", tmp_path / "x.gguf")
    theirs = _transformers_byte_level(byte_level_vocab, _SAME_SPLIT_AS.get(pre, pre))
    theirs.model.ignore_merges = pre in _IGNORE_MERGES
    _assert_same_ids(ours, theirs, _PRE_TEXTS)


def test_byte_level_test_vocabulary_tells_the_splits_apart(byte_level_vocab: dict, tmp_path: Path) -> None:
    """The parity test above would catch a wrong split: on its texts, each family's reference differs from
    the others, and so does loom's old digit-split-first smollm tokenizer."""
    refs = {pre: _transformers_byte_level(byte_level_vocab, pre) for pre in ("smollm", "llama3", "qwen2", "stablelm2")}
    encode = {pre: [ref.encode(t).ids for t in _PRE_TEXTS] for pre, ref in refs.items()}
    assert encode["smollm"] != encode["llama3"] != encode["qwen2"] != encode["smollm"]
    assert encode["stablelm2"] != encode["qwen2"]  # what _SAME_SPLIT_AS["stablelm2"] changes
    old = build_tokenizer(byte_level_vocab | {"pre": "smollm"}, "llama", tmp_path / "x.gguf")
    old.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), old.pre_tokenizer])
    assert [old.encode(t).ids for t in _PRE_TEXTS] != encode["smollm"]


def test_llama3_keeps_whole_tokens_that_no_merge_builds(byte_level_vocab: dict, tmp_path: Path) -> None:
    """The ignore_merges difference: a word that is a token stays whole for Llama-3-style names, as in
    Llama 3's own tokenizer and llama.cpp, where transformers' GGUF tokenizer cuts it up."""
    unreachable = byte_level_vocab["tokens"].index(_UNREACHABLE)
    llama3 = build_tokenizer(byte_level_vocab | {"pre": "llama3"}, "llama", tmp_path / "x.gguf")
    assert llama3.encode(_UNREACHABLE, add_special_tokens=False).ids == [unreachable]
    assert unreachable not in _transformers_byte_level(byte_level_vocab, "llama3").encode(_UNREACHABLE).ids
    qwen2 = build_tokenizer(byte_level_vocab | {"pre": "qwen2"}, "llama", tmp_path / "x.gguf")
    assert unreachable not in qwen2.encode(_UNREACHABLE).ids


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
