"""Tokenizer wrapper over a Hugging Face tokenizer directory, and the incremental detokenizer.

Reads ``tokenizer.json`` with the ``tokenizers`` library (transformers is not a runtime
dependency) plus the bits of ``tokenizer_config.json`` / ``chat_template.jinja`` /
``generation_config.json`` / ``config.json`` that transformers would apply: special tokens,
``add_bos_token``/``add_eos_token``, the chat template, and the ids that end generation.
``clean_up_tokenization_spaces`` is not applied (the models loom serves turn it off, and it
would make decoding non-incremental).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in some
    templates; for rendering it is a no-op, but without it those templates do not compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Like transformers: jinja's own tojson HTML-escapes, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses, so renders are byte-identical."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """Special tokens appear in configs as plain strings or as serialised AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


class Tokenizer:
    """Text <-> token ids, special tokens, and chat templates of one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        generation_eos_token_ids: Sequence[int] = (),
        fallback_bos_token_id: int | None = None,
    ) -> None:
        """``add_bos_token``/``add_eos_token``: None keeps what tokenizer.json's post-processor
        does; a bool overrides it (as transformers does when the config sets them)."""
        # Some tokenizer.json files carry training-time truncation/padding; a prompt must never be cut.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._add_bos = add_bos_token
        self._add_eos = add_eos_token
        self._compiled_template: jinja2.Template | None = None
        self.bos_token_id = self._id_of("bos_token")
        if self.bos_token_id is None:
            self.bos_token_id = fallback_bos_token_id
        self.eos_token_id = self._id_of("eos_token")
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *generation_eos_token_ids]))
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        special.update(i for i in (self._id_of(name) for name in self.special_tokens) if i is not None)
        self.all_special_ids: tuple[int, ...] = tuple(sorted(special))
        self._context_ids = backend.encode("a", add_special_tokens=False).ids[-1:]
        self._context_text = backend.decode(self._context_ids, skip_special_tokens=False)
        self._token_strs: dict[int, str] = {}
        self._special_texts = tuple(t.content for t in backend.get_added_tokens_decoder().values() if t.special)

    @staticmethod
    def from_dir(model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {model_dir}")
        config = _read_json(model_dir / "tokenizer_config.json")
        special_tokens = {name: content for name in _SPECIAL_TOKEN_NAMES if (content := _token_content(config.get(name)))}
        generation = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        eos_source = generation if "eos_token_id" in generation else model_config
        return Tokenizer(
            BackendTokenizer.from_file(str(path)),
            special_tokens=special_tokens,
            chat_template=_read_chat_template(model_dir, config),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            generation_eos_token_ids=_id_list(eos_source.get("eos_token_id")),
            fallback_bos_token_id=model_config.get("bos_token_id"),
        )

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """The longest vocabulary entry, in characters: no token covers more of the (normalized)
        text. Byte-level entries spell each byte as one character, so this over-counts: a bound."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Safe to call from any thread, and it lets other threads run
        meanwhile (``encode_batch`` releases the GIL, ``encode`` does not)."""
        if self._add_bos is None and self._add_eos is None:
            return self._encode(self.backend, text, add_special_tokens)
        # The config overrides the post-processor: exactly the configured BOS/EOS, never doubled.
        ids = self._encode(self.backend, text, False)
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    @staticmethod
    def _encode(backend: BackendTokenizer, text: str, add_special_tokens: bool) -> list[int]:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens = [self.backend.id_to_token(i) for i in ids]
        for i, token in zip(ids, tokens):
            if token is None:
                raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
        return tokens

    def token_to_str(self, token_id: int) -> str:
        """Text of one token as it reads inside running text (e.g. for logprobs): decoded after a
        context token so decoders that strip a leading space (SentencePiece) keep it."""
        text = self._token_strs.get(token_id)
        if text is None:
            decoded = self.backend.decode([*self._context_ids, token_id], skip_special_tokens=False)
            text = decoded[len(self._context_text) :]
            self._token_strs[token_id] = text
        return text

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation with the model's template, the way transformers does
        (same Jinja environment and variables; extra ``kwargs`` such as ``tools`` are passed through)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt (completions) instead of messages")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        try:
            return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e


    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, allow_special_tokens_in_content: bool = False,
        **kwargs: Any,
    ) -> list[int]:
        """The token ids of a conversation rendered with the chat template. Special tokens spelled
        out inside a message's content are encoded as plain text, so that content cannot forge
        turns ("<|im_end|>\\n<|im_start|>system\\n..."); only the template's own are control
        tokens. ``allow_special_tokens_in_content``: parse them in content too (the raw rendering).
        ``kwargs`` (such as ``tools``) go to the template.

        A conversation whose contents hold no special token is encoded exactly as its rendering
        (as transformers does); otherwise those spellings are swapped for placeholders while the
        template renders, and the text between the template's special tokens is encoded with
        special-token parsing off, placeholders swapped back."""
        placeholders = {} if allow_special_tokens_in_content else self._placeholders(messages)
        if placeholders:
            messages = [_replace_content(m, placeholders) for m in messages]
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        if not placeholders:
            return self.encode(text, add_special_tokens=False)
        return self._encode_with_escapes(text, {v: k for k, v in placeholders.items()})

    def _placeholders(self, messages: list[dict[str, Any]]) -> dict[str, str]:
        """A private-use character for each special token spelled out in some message's content
        (one that no content holds, so swapping back is exact)."""
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
        found = sorted((t for t in self._special_texts if any(t in c for c in contents)), key=len, reverse=True)
        free = (chr(c) for c in range(0x10FFFD, 0xF0000, -1) if not any(chr(c) in t for t in contents))
        return dict(zip(found, free))

    def _encode_with_escapes(self, text: str, originals: dict[str, str]) -> list[int]:
        """``text``'s ids, where the spans between special tokens that hold a placeholder are
        re-encoded, with the placeholders' originals, as plain text."""
        encoding = self.backend.encode_batch([text], add_special_tokens=False)[0]
        special_ids = set(self.all_special_ids)
        ids: list[int] = []
        span: list[int] = []  # the tokens since the last special one
        start = 0  # where that span starts in text
        for token_id, (begin, end) in [*zip(encoding.ids, encoding.offsets), (None, (len(text), len(text)))]:
            if token_id is not None and token_id not in special_ids:
                span.append(token_id)
                continue
            chunk = text[start:begin]
            if any(p in chunk for p in originals):
                for placeholder, original in originals.items():
                    chunk = chunk.replace(placeholder, original)
                span = self._encode(self._plain_backend, chunk, False)
            ids += span
            if token_id is not None:
                ids.append(token_id)
            span, start = [], end
        return ids

    @functools.cached_property
    def _plain_backend(self) -> BackendTokenizer:
        """A copy of the backend that encodes special tokens' spellings as text (a copy, not a
        toggle: encoding runs on several threads)."""
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return backend


def _replace_content(message: dict[str, Any], replacements: dict[str, str]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, str):
        return message
    for old, new in replacements.items():
        content = content.replace(old, new)
    return {**message, "content": content}


class IncrementalDetokenizer:
    """Turns one sample's output tokens into text deltas as they arrive.

    Deltas never contain a partial UTF-8 character (bytes are held back until the character is
    complete) and concatenate to ``tokenizer.decode(output_ids)``, leading-space handling
    included; ``flush()`` releases what is still held when the sample ends. Each step decodes
    only a short window of recent tokens (``tokenizers``' DecodeStream: vLLM's prefix/read
    offsets). The text depends on the output alone: a continuation's leading space follows
    ``decode(output)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._text = ""

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        new_ids = list(token_ids)
        if not new_ids:
            return ""
        num_previous = len(self._ids)
        self._ids += new_ids
        try:
            chunk = self._stream.step(self._tokenizer.backend, new_ids)
        except Exception as e:  # tokenizers raises a bare Exception for this
            if "Invalid prefix" not in str(e):
                raise
            chunk = self._resync(num_previous, new_ids)
        delta = chunk or ""
        self._text += delta
        return delta

    def _resync(self, num_previous: int, new_ids: list[int]) -> str:
        """A decoder that is not prefix-stable rewrote already-streamed text (sent text cannot be
        taken back). Restart from the tokens seen so far and stream what follows them."""
        self._stream = DecodeStream(ids=self._ids[:num_previous], skip_special_tokens=self._skip)
        try:
            return self._stream.step(self._tokenizer.backend, new_ids) or ""
        except Exception as e:
            if "Invalid prefix" not in str(e):
                raise
            self._stream = DecodeStream(ids=self._ids, skip_special_tokens=self._skip)
            return ""

    def flush(self) -> str:
        """At the end of a sample: the held-back tail (e.g. an incomplete character, as U+FFFD)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        delta = full[len(self._text) :] if full.startswith(self._text) else ""
        self._text += delta
        return delta
