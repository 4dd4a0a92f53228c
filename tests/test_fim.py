"""Fill-in-the-middle tokens found in a vocabulary, and the prompts built with them."""

from __future__ import annotations

from tokenizers import Tokenizer as BackendTokenizer

from loom.fim import FimTokens
from loom.tokenizer import Tokenizer
from tests.tiny_models import default_tokenizer_files


def _tokenizer(*added: str) -> Tokenizer:
    backend = BackendTokenizer.from_str(default_tokenizer_files()["tokenizer.json"].decode())
    backend.add_special_tokens(list(added))
    return Tokenizer(backend)


def test_fim_tokens_of_each_naming_scheme_and_none():
    assert FimTokens.find(_tokenizer()) is None  # the default model's vocabulary has none
    assert FimTokens.find(_tokenizer("<|fim_prefix|>", "<|fim_suffix|>")) is None  # all three or nothing
    qwen = _tokenizer("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    assert FimTokens.find(qwen) == FimTokens(49152, 49153, 49154)
    starcoder = _tokenizer("<fim_middle>", "<fim_prefix>", "<fim_suffix>")
    assert FimTokens.find(starcoder) == FimTokens(49153, 49154, 49152)


def test_prompt_is_prefix_suffix_middle():
    tok = _tokenizer("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    fim = FimTokens.find(tok)
    assert fim is not None
    before, after = "def add(a, b):\n    ", "\n    return c\n"
    tail = tok.encode(after, add_special_tokens=False)
    assert fim.prompt(tok, before, after) == [fim.prefix, *tok.encode(before, add_special_tokens=False), fim.suffix,
                                              *tail, fim.middle]
    assert fim.prompt(tok, [5, 6], after) == [fim.prefix, 5, 6, fim.suffix, *tail, fim.middle]
    assert tok.decode(fim.prompt(tok, before, after), skip_special_tokens=False) == (
        f"<|fim_prefix|>{before}<|fim_suffix|>{after}<|fim_middle|>")
