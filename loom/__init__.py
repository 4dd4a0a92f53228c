"""loom: an LLM inference and serving engine (paged KV cache, continuous batching, OpenAI API)."""

from loom.engine import LLM, Engine
from loom.outputs import CompletionOutput, RequestOutput
from loom.sampling import SamplingParams
from loom.structured import StructuredOutputs

__all__ = ["LLM", "CompletionOutput", "Engine", "RequestOutput", "SamplingParams", "StructuredOutputs"]
__version__ = "0.1.0"
