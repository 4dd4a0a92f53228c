"""Architecture registry: the ``ModelConfig.architecture`` name -> its model class.

Adding an architecture is one module here plus one line in ``ARCHITECTURES``."""

from __future__ import annotations

from loom.model.arch.base import CausalLM
from loom.model.arch.gemma3 import Gemma3ForCausalLM
from loom.model.arch.llama import LlamaForCausalLM, Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r} (supported: {', '.join(ARCHITECTURES)})") from None
