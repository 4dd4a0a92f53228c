"""Structured output: constraining a request's tokens to a JSON schema, regex, choice or grammar."""

from loom.structured.grammar import GrammarCompiler, GrammarError, GrammarState, apply_token_bitmask, fill_bitmasks, new_bitmask
from loom.structured.params import StructuredOutputs

__all__ = ["GrammarCompiler", "GrammarError", "GrammarState", "StructuredOutputs", "apply_token_bitmask", "fill_bitmasks",
           "new_bitmask"]
