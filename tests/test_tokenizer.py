"""Tokenizer wrapper and incremental detokenizer, checked against Hugging Face transformers."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, trainers

from loom.model.files import default_model_path
from loom.tokenizer import IncrementalDetokenizer, Tokenizer

import transformers

_CACHE = Path("/tmp/loom-test-tokenizer")

TEXTS = [
    "Hello world!",
    "naïve café, résumé — Ångström; Straße",
    "emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 done",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "code:\n\tdef f(x):\n\t    return x ** 2  # comment\n\n",
    "  leading and trailing spaces  ",
    "special <|im_start|>user\nhi<|im_end|> inside",
    "",
]


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model's tokenizer as an HF directory, converted by transformers from the GGUF
    (an independent reference for loom's own converter); cached across runs."""
    if not (_CACHE / "tokenizer.json").is_file():
        gguf = default_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _CACHE.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="loom-test-tokenizer-", dir=_CACHE.parent))
        tok.save_pretrained(staging)
        try:
            os.rename(staging, _CACHE)  # atomic: concurrent sessions never see half a directory
        except OSError:  # another session won the race
            shutil.rmtree(staging)
    return _CACHE


@pytest.fixture(scope="session")
def tok(smollm_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="session")
def hf_tok(smollm_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(smollm_dir)


def _copy_dir(src: Path, dst: Path, **config_updates: object) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_updates)
    config_path.write_text(json.dumps(config))
    return dst


def _sentencepiece_dir(path: Path, *, strip_leading_space: bool) -> Path:
    """A small SentencePiece-style BPE (▁ for spaces, byte fallback for unseen characters), laid
    out like Llama's (``strip_leading_space``: prepend ▁ when encoding, strip it when decoding)
    or Gemma's tokenizer.json."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, hello there; the world is wide",
        "naïve café résumé and some more words for merges",
        "a stream of tokens becomes text, one piece at a time",
    ] * 20
    trainer_model = BackendTokenizer(models.BPE(unk_token="<unk>"))
    replace_spaces = normalizers.Replace(" ", "▁")
    trainer_model.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace_spaces]) if strip_leading_space else replace_spaces
    )
    trainer_model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(trainer_model.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_leading_space:
        steps.append(decoders.Strip(" ", 1, 0))
    backend = BackendTokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(steps)
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": strip_leading_space}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# -- the wrapper against transformers ---------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str, add_special_tokens: bool) -> None:
    assert tok.encode(text, add_special_tokens=add_special_tokens) == hf_tok.encode(text, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip_and_parity(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens_and_sizes(tok: Tokenizer, hf_tok) -> None:
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tok.eos_token_id,) == (2,)
    assert tok.vocab_size == len(hf_tok) == 49152
    assert set(hf_tok.all_special_ids) <= set(tok.all_special_ids)
    # every id counted as special is one that decode(skip_special_tokens=True) drops
    assert tok.decode(list(tok.all_special_ids), skip_special_tokens=True) == ""


def test_convert_ids_to_tokens(tok: Tokenizer, hf_tok) -> None:
    ids = tok.encode(TEXTS[1] + TEXTS[2])
    assert tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
    with pytest.raises(ValueError, match="49152"):
        tok.convert_ids_to_tokens([49152])


def test_token_to_str(tok: Tokenizer, tmp_path: Path) -> None:
    world = tok.encode(" world", add_special_tokens=False)
    assert len(world) == 1 and tok.token_to_str(world[0]) == " world"
    assert tok.token_to_str(2) == "<|im_end|>"
    sp = Tokenizer.from_dir(_sentencepiece_dir(tmp_path / "sp", strip_leading_space=True))
    (hello,) = sp.encode("hello", add_special_tokens=False)
    assert sp.decode([hello]) == "hello"  # the decoder strips the first token's leading space...
    assert sp.token_to_str(hello) == " hello"  # ...but inside running text it is there


def test_add_bos_token_config_overrides_post_processor(smollm_dir: Path, tmp_path: Path) -> None:
    """Explicit add_bos_token/add_eos_token in the config decide, as in transformers'
    update_post_processor (tokenizer.json's post-processor here adds nothing)."""
    ours = Tokenizer.from_dir(_copy_dir(smollm_dir, tmp_path / "bos", add_bos_token=True, add_eos_token=True))
    for text in ("Hello world", ""):
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == Tokenizer.from_dir(smollm_dir).encode(text)
        assert ours.encode(text) == [1, *plain, 2]


def test_bos_from_post_processor_is_not_doubled(tmp_path: Path) -> None:
    path = _sentencepiece_dir(tmp_path / "sp", strip_leading_space=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    backend.save(str(path / "tokenizer.json"))
    bos = backend.token_to_id("<s>")
    for add_bos in (True, None):  # explicit in the config, or left to the post-processor
        config.pop("add_bos_token", None)
        if add_bos is not None:
            config["add_bos_token"] = add_bos
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        ids = Tokenizer.from_dir(path).encode("hello world")
        assert ids == transformers.AutoTokenizer.from_pretrained(path).encode("hello world")
        assert ids.count(bos) == 1 and ids[0] == bos


def test_truncation_and_padding_in_tokenizer_json_are_ignored(smollm_dir: Path, tmp_path: Path) -> None:
    path = _copy_dir(smollm_dir, tmp_path / "trunc")
    backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64, pad_id=2)
    backend.save(str(path / "tokenizer.json"))
    text = "a prompt that is longer than four tokens"
    assert Tokenizer.from_dir(path).encode(text) == Tokenizer.from_dir(smollm_dir).encode(text)


def test_eos_ids_include_generation_config(smollm_dir: Path, tmp_path: Path) -> None:
    path = _copy_dir(smollm_dir, tmp_path / "gen")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_dir(path).eos_token_ids == (2, 0)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# -- chat templates ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Tell me a joke about café naïveté 😀"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?\n\nExplain."},
    ],
]

# Exercises what real templates use: loop controls, namespace, tojson, raise_exception, bos/eos,
# strftime_now and the {% generation %} tag.
RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  <{{ m['role'] }} n={{ ns.turns }}>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<assistant n={{ ns.turns + 1 }}>{% endif %}
{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('no date') }}{% endif %}"""


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok, messages: list, add_generation_prompt: bool) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rich_chat_template_matches_transformers(smollm_dir: Path, tmp_path: Path, messages: list) -> None:
    path = _copy_dir(smollm_dir, tmp_path / "rich")
    (path / "chat_template.jinja").write_text(RICH_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "f", "description": "café <b>", "parameters": {}}}]
    ours = Tokenizer.from_dir(path).apply_chat_template(messages, tools=tools)
    theirs = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert 'TOOLS [{"type": "function"' in ours and "café <b>" in ours  # tojson: no HTML or ASCII escaping


def test_chat_template_raise_exception_is_value_error(smollm_dir: Path, tmp_path: Path) -> None:
    path = _copy_dir(smollm_dir, tmp_path / "rich")
    (path / "chat_template.jinja").write_text(RICH_TEMPLATE)
    with pytest.raises(ValueError, match="bad role: tool"):
        Tokenizer.from_dir(path).apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_errors(smollm_dir: Path, tmp_path: Path) -> None:
    no_template = _copy_dir(smollm_dir, tmp_path / "none")
    (no_template / "chat_template.jinja").unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(no_template).apply_chat_template(CONVERSATIONS[0])
    broken = _copy_dir(smollm_dir, tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="invalid chat template"):
        Tokenizer.from_dir(broken).apply_chat_template(CONVERSATIONS[0])


def test_chat_template_from_tokenizer_config(smollm_dir: Path, tmp_path: Path) -> None:
    path = _copy_dir(smollm_dir, tmp_path / "cfg", chat_template=[{"name": "default", "template": "{{ messages[0]['content'] }}!"}])
    (path / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[0]) == "Hi there!!"


# -- incremental detokenizer ------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int], chunks: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    deltas, pos = [], 0
    for size in chunks:
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
    assert pos == len(ids)
    assert detok.text == "".join(deltas)
    return deltas


def _check_stream(tokenizer: Tokenizer, text: str, skip_special_tokens: bool = True) -> list[str]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    rng = random.Random(len(text))
    random_chunks, remaining = [], len(ids)
    while remaining:  # several tokens per step, as speculative decoding delivers them
        random_chunks.append(min(rng.randint(1, 3), remaining))
        remaining -= random_chunks[-1]
    for chunks in ([1] * len(ids), random_chunks):
        deltas = _stream(tokenizer, ids, chunks, skip_special_tokens)
        assert "".join(deltas) == expected
        assert not any("\ufffd" in d for d in deltas)
    return _stream(tokenizer, ids, [1] * len(ids), skip_special_tokens)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_byte_level(tok: Tokenizer, text: str, skip_special_tokens: bool) -> None:
    _check_stream(tok, text, skip_special_tokens)


def test_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji's 4 bytes span several byte-level tokens
    deltas = _check_stream(tok, "😀")
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "😀"


def test_detokenizer_flush_releases_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # end inside the emoji
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add([i]) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(ids)
    assert detok.text == tok.decode(ids) and detok.text.endswith("\ufffd")


@pytest.mark.parametrize("strip_leading_space", [True, False], ids=["llama-style", "gemma-style"])
@pytest.mark.parametrize("text", ["hello world", " the fox, naïve café 😀 日本 ok", "world\nnew  lines"])
def test_detokenizer_sentencepiece(tmp_path: Path, strip_leading_space: bool, text: str) -> None:
    sp = Tokenizer.from_dir(_sentencepiece_dir(tmp_path / "sp", strip_leading_space=strip_leading_space))
    ids = sp.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in sp.convert_ids_to_tokens(sp.encode("😀 日本", add_special_tokens=False)))
    # Llama-style: the first token carries a "▁" that decode() strips; the stream must strip it too
    assert sp.convert_ids_to_tokens(ids)[0].startswith("▁") == (strip_leading_space or text.startswith(" "))
    assert "".join(_check_stream(sp, text)) == text


def test_detokenizer_recovers_from_unstable_decoder(smollm_dir: Path) -> None:
    """A decoder whose output for earlier tokens changes when more arrive cannot be streamed
    exactly; the detokenizer must keep going rather than raise."""

    class Rewriting:
        def decode_chain(self, tokens: list[str]) -> list[str]:
            return ["".join(tokens).replace("Ġ", " ").replace("ab", "X")]

    tokenizer = Tokenizer.from_dir(smollm_dir)
    tokenizer.backend.decoder = decoders.Decoder.custom(Rewriting())
    ids = tokenizer.encode("xa", add_special_tokens=False) + tokenizer.encode("bcd", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids] + [detok.add(tokenizer.encode("!", add_special_tokens=False))]
    assert deltas == ["xa", "", "cd", "!"]
