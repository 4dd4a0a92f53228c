"""Rebuild a Hugging Face ``tokenizer.json`` from the tokenizer a GGUF file carries in its metadata.

A GGUF stores the vocabulary (``tokenizer.ggml.tokens``), merges or scores, token types and special
ids under llama.cpp's key names. Two families are supported:

* ``gpt2``: byte-level BPE with explicit merges; ``tokenizer.ggml.pre`` names how text is split
  before BPE, and the split is the one transformers' GGUF tokenizer uses for that name (see
  ``_byte_level_pre_tokenizer`` for where, and why, it departs from llama.cpp).
* ``llama``: SentencePiece-style BPE with byte fallback. The file lists no merges, so they are
  rebuilt from the vocabulary, ranked by score (Gemma: by position in the file, since its scores do
  not follow merge order).

Everything is built with the ``tokenizers`` library; transformers is not needed at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from loom.model.gguf_meta import GGUFError, field_value

# llama.cpp token types (llama_token_type): 3 = control (special), 4 = user defined, 6 = byte.
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> how text is split before byte-level BPE. The reference is the tokenizer transformers
# builds from the same file (transformers/integrations/gguf/gguf_tokenizer_mapping.py): GPT-2's
# ByteLevel regex unless its GGUF_PRE_TOKENIZER_SPLITS names a Split regex for the name.
#
# llama.cpp (llama-vocab.cpp) and these models' own tokenizer.json split off every digit (\p{N}, or
# Digits(individual_digits=True)) *before* the GPT-2 regex, so the regex runs on each piece alone and
# `\s+(?!\S)` cannot see the digit after a whitespace run: "follows:\n\n1." gives "\n\n" as one token
# there. transformers runs the GPT-2 regex on the whole text, where `\s+(?!\S)` leaves the last
# whitespace character to the next piece: "\n", "\n", "1". We follow transformers. Digits themselves
# come out the same either way: a vocabulary trained on one-digit pieces holds no merge that joins a
# digit to anything (SmolLM2's has none; tests/model/test_gguf_tokenizer.py checks it).
_DIGIT_SPLIT_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_PLAIN_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
# Deliberately not transformers': it has no entry for "stablelm2" and falls back to GPT-2's regex, while
# StableLM 2's own tokenizer and llama.cpp use Qwen2's split (digits one by one, cl100k-style words).
_QWEN2 = ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")
SUPPORTED_PRE = _DIGIT_SPLIT_GPT2 + _PLAIN_GPT2 + _LLAMA3 + _QWEN2

# Control tokens that end a turn whatever the file's eos id says (as in llama.cpp's llama-vocab.cpp).
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"}
)

# SentencePiece vocabularies whose merges follow file order rather than scores.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class GGUFTokenizerError(GGUFError):
    """The tokenizer described by a GGUF file is missing, malformed or of an unsupported kind."""


def _byte_level_pre_tokenizer(pre: str, path: Path) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for ``tokenizer.ggml.pre`` and whether BPE should ignore merges (llama3).

    ``ignore_merges`` (a word that is itself a token stays whole) is a deliberate difference from
    transformers, which never sets it: Llama 3's own tokenizer.json and llama.cpp do, and without it a
    token that no chain of merges reaches would come out in pieces the model never saw."""
    if pre in _DIGIT_SPLIT_GPT2 or pre in _PLAIN_GPT2:
        # GPT-2's regex over the whole text, no digit split first (see the note above _DIGIT_SPLIT_GPT2).
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT if pre in _QWEN2 else None
    if split is None:
        raise GGUFTokenizerError(
            f"{path}: unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(SUPPORTED_PRE)})"
        )
    seq = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return seq, pre in _LLAMA3


def _byte_level(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, list[str]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens: list[str] = meta["tokens"]
    # Every real byte-level token is spelled in the byte alphabet; respell any that is not.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    merges = []
    for merge in meta.get("merges") or ():
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFTokenizerError(f"{path}: malformed merge {merge!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise GGUFTokenizerError(f"{path}: byte-level tokenizer without tokenizer.ggml.merges")
    pre, ignore_merges = _byte_level_pre_tokenizer(meta.get("pre") or "default", path)
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _sentencepiece(meta: dict[str, Any], arch: str, path: Path) -> tuple[Tokenizer, list[str]]:
    tokens: list[str] = meta["tokens"]
    scores = meta.get("scores")
    gemma = arch in _GEMMA_ARCHS
    if gemma:
        # Gemma files store tokens made only of spaces as real spaces; the model spells them with "▁".
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        rank = {t: -i for i, t in enumerate(tokens)}
    elif scores is None:
        raise GGUFTokenizerError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
    else:
        rank = dict(zip(tokens, scores))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("unk_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merges_from_vocab(vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        prefix = bool(meta.get("add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok, tokens


def _merges_from_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best-ranked merged token first (ties: longer left piece first, then by piece ids)."""
    found: list[tuple[float, int, int, int, int, str, str]] = []
    for token, score in rank.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                found.append((-score, -len(left), -len(right), li, ri, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def read_tokenizer_meta(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """The tokenizer fields of a GGUF file under short names (``tokens``, ``merges``, ``bos_id`` ...)."""
    keys = {
        "model": "tokenizer.ggml.model",
        "pre": "tokenizer.ggml.pre",
        "tokens": "tokenizer.ggml.tokens",
        "scores": "tokenizer.ggml.scores",
        "token_type": "tokenizer.ggml.token_type",
        "merges": "tokenizer.ggml.merges",
        "bos_id": "tokenizer.ggml.bos_token_id",
        "eos_id": "tokenizer.ggml.eos_token_id",
        "unk_id": "tokenizer.ggml.unknown_token_id",
        "pad_id": "tokenizer.ggml.padding_token_id",
        "eot_id": "tokenizer.ggml.eot_token_id",
        "eom_id": "tokenizer.ggml.eom_token_id",
        "add_bos": "tokenizer.ggml.add_bos_token",
        "add_eos": "tokenizer.ggml.add_eos_token",
        "add_space_prefix": "tokenizer.ggml.add_space_prefix",
        "chat_template": "tokenizer.chat_template",
    }
    meta = {name: field_value(reader, key) for name, key in keys.items()}
    meta = {k: v for k, v in meta.items() if v is not None}
    if "tokens" not in meta or "model" not in meta:
        raise GGUFTokenizerError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens)")
    n = len(meta["tokens"])
    for key in ("scores", "token_type"):
        if key in meta and len(meta[key]) != n:
            raise GGUFTokenizerError(f"{path}: tokenizer.ggml.{key} has {len(meta[key])} entries for {n} tokens")
    for key in ("bos_id", "eos_id", "unk_id", "pad_id", "eot_id", "eom_id"):
        if key in meta and not 0 <= meta[key] < n:
            del meta[key]  # llama.cpp writes out-of-range ids (e.g. -1) to mean "none"
    return meta


def build_tokenizer(meta: dict[str, Any], arch: str, path: Path) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` the GGUF metadata ``meta`` (from :func:`read_tokenizer_meta`) describes."""
    kind = meta["model"]
    if kind == "gpt2":
        tok, spelled = _byte_level(meta, path)
    elif kind == "llama":
        tok, spelled = _sentencepiece(meta, arch, path)
    else:
        raise GGUFTokenizerError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")
    types = meta.get("token_type") or []
    original = meta["tokens"]
    vocab = set(spelled)
    # Whole-token matching for control tokens (special) and user-defined ones (not special), as llama.cpp
    # does; only tokens whose spelling the model vocabulary kept, so no new ids are created. (A byte-level
    # control token spelled outside the byte alphabet is a llama.cpp mislabel and stays a plain token.)
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, s, ty in zip(original, spelled, types)
        if ty == TOKEN_CONTROL and t == s
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, s, ty in zip(original, spelled, types)
        if ty == TOKEN_USER_DEFINED and t in vocab
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if len(tok.get_vocab(with_added_tokens=True)) != len(original):
        raise GGUFTokenizerError(f"{path}: tokenizer vocabulary has duplicate tokens")
    bos_id = meta.get("bos_id")
    if default_add_bos(meta) and bos_id is not None:
        bos = original[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def default_add_bos(meta: dict[str, Any]) -> bool:
    """Whether to prepend BOS: the file's flag, else llama.cpp's default (on for SentencePiece
    vocabularies and llama3-style byte-level ones)."""
    return bool(meta.get("add_bos", meta["model"] == "llama" or meta.get("pre") in _LLAMA3))


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer_config.json`` content: special token strings, BOS/EOS flags, chat template."""
    tokens = meta["tokens"]
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": default_add_bos(meta),
        "add_eos_token": bool(meta.get("add_eos", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (
        ("bos_token", "bos_id"),
        ("eos_token", "eos_id"),
        ("unk_token", "unk_id"),
        ("pad_token", "pad_id"),
    ):
        if key in meta:
            cfg[name] = tokens[meta[key]]
    if "chat_template" in meta:
        cfg["chat_template"] = meta["chat_template"]
    return cfg


def eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """Every id that ends generation: EOS, end-of-turn / end-of-message when the file names them, and
    control tokens that llama.cpp also treats as end of generation by their text (its EOG heuristic)."""
    ids = [meta[k] for k in ("eos_id", "eot_id", "eom_id") if k in meta]
    types = meta.get("token_type") or []
    ids += [i for i, (t, ty) in enumerate(zip(meta["tokens"], types)) if ty == TOKEN_CONTROL and t in _EOG_TEXTS]
    return list(dict.fromkeys(ids))


def write_tokenizer(reader: GGUFReader, arch: str, path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return the metadata read."""
    meta = read_tokenizer_meta(reader, path)
    build_tokenizer(meta, arch, path).save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w") as f:
        json.dump(tokenizer_config(meta), f, indent=2, ensure_ascii=False)
    return meta
