"""Fill-in-the-middle prompts for code models trained with FIM tokens (Qwen2.5-Coder's
``<|fim_prefix|>``, StarCoder's ``<fim_prefix>``, ...): the model sees the text before and after a
gap and generates what goes in between."""

from __future__ import annotations

from dataclasses import dataclass

from loom.tokenizer import Tokenizer

# (prefix, suffix, middle) token names, by family.
_NAMES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
)


@dataclass(frozen=True)
class FimTokens:
    """The ids of a vocabulary's FIM tokens."""

    prefix: int
    suffix: int
    middle: int

    @staticmethod
    def find(tokenizer: Tokenizer) -> FimTokens | None:
        """The FIM tokens of ``tokenizer``'s vocabulary, or None if it has none."""
        for names in _NAMES:
            ids = [tokenizer.backend.token_to_id(name) for name in names]
            if all(i is not None for i in ids):
                return FimTokens(*ids)  # type: ignore[arg-type]
        return None

    def prompt(self, tokenizer: Tokenizer, prefix: str | list[int], suffix: str) -> list[int]:
        """``<prefix> prefix <suffix> suffix <middle>`` (prefix-suffix-middle order): what the
        model generates next is the middle. Texts are encoded without special tokens; a token-id
        prefix is taken as it is."""
        head = prefix if isinstance(prefix, list) else tokenizer.encode(prefix, add_special_tokens=False)
        tail = tokenizer.encode(suffix, add_special_tokens=False)
        return [self.prefix, *head, self.suffix, *tail, self.middle]
