"""Strings for tokenizer parity tests."""

from __future__ import annotations

import random


def varied_texts(n_random: int = 300) -> list[str]:
    """Hand-picked hard cases plus seeded random strings over a mixed alphabet."""
    texts = [
        "Hello world",
        "  leading spaces",
        "trailing   ",
        "tabs\tand\nnewlines\n\n\n",
        "   \n \n  ",
        "",
        "a",
        "12345 67.89 1,000,000 3.14159e-10",
        "emoji 😀🎉👍🏽 👨‍👩‍👧 and 中文字符 한국어 العربية עברית",
        "def f(x):\n    return x**2  # comment\n\tif x: pass",
        "Ünïcödé café naïve façade Ærøskøbing",
        "don't won't it's I'm we're they've y'all'd",
        "x" * 80,
        "http://example.com/a?b=c&d=e#frag",
        "\u00a0nbsp\u2009thin\u200bzero-width",
        "ﬁ ligature \u00c5 A\u030a (composed / decomposed)",
        "\x00\x01\x7f control",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><|im_end|><|im_start|>",
        "<start_of_turn>user\nhey<end_of_turn>\n<start_of_turn>model\n",
        "<bos><eos><pad> [multimodal]",
        "not special: <|im_start |> <im_start>",
        "SELECT * FROM t WHERE a >= 10;",
        '{"json": [1, 2, {"k": null}]}',
    ]
    rnd = random.Random(0)
    alphabet = "abcXYZ 0123456789 \n\t.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`éüßøπλ中文日本語😀🔥\u00a0"
    no_digits = "".join(c for c in alphabet if not c.isdigit())
    for i in range(n_random):
        texts.append("".join(rnd.choice(alphabet if i % 2 else no_digits) for _ in range(rnd.randint(1, 60))))
    return texts


# The example where loom once split differently from transformers ("\n\n" as one token before a digit).
NUMBERED_LIST = "The rules are as follows:\n\n1. The game starts.\n2. Players take turns.\n\n3."

_WHITESPACE = [
    " ", "  ", "   ", "\t", "\t\t", " \t", "\t ", "\n", "\n\n", "\n\n\n", "\r", "\r\n", "\r\n\r\n", " \n", "\n ",
    "\n  ", " \n\n", "\n\t", "\t\n", " \r\n ", "\n \n", "\u00a0", "\u00a0 ", " \u3000",
]
_BEFORE = ["", "x", "follows:", "7", "."]
_AFTER = ["1", "12345", "a", "Word", "!", ".", "-1", "(", "\u4e2d", "\U0001f600", ""]  # "" = end of text
_DIGITS = [
    "12345", " 2024", "a1b22", "3.14159", "1,000,000", "x 1 22 333 4444 55555", "2024-01-01T12:00:00Z",
    "v1.2.3", "0x1F", "1st 2nd 3rd", "\uff11\uff12\uff13", "\u0663\u0664\u0665", "x\u00b2 + y\u00b3", "(12)[34]{56}",
    "  42", "\t7", "\n\n\n9", "99\n\n", "1 \n 2",
]


def whitespace_digit_texts() -> list[str]:
    """Whitespace runs (spaces, tabs, newlines, CRLF, mixed) before digits, letters, punctuation and the
    end of the text, after a few different left contexts; digit runs; and ``NUMBERED_LIST``."""
    runs = [f"{b}{w}{a}" for b in _BEFORE for w in _WHITESPACE for a in _AFTER]
    return [NUMBERED_LIST] + runs + _DIGITS + [" ".join(_WHITESPACE) + "1", "1".join(_WHITESPACE)]
