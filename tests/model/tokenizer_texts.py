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
