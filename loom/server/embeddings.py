"""``POST /v1/embeddings``: the model's final hidden states, mean-pooled over each input's tokens
and L2-normalised, computed by the engine (a prefill-only request kind) alongside generation."""

from __future__ import annotations

import base64
import struct
from typing import Any

from fastapi import Request

from loom.server.errors import APIError
from loom.server.protocol import EmbeddingRequest
from loom.server.serving import Serving, cancel_on_disconnect, new_id, request_tenant


def _encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    """A list of floats, or OpenAI's base64 of little-endian float32s."""
    if encoding_format == "float":
        return embedding
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode("ascii")


async def create_embeddings(req: EmbeddingRequest, raw: Request, serving: Serving) -> dict[str, Any]:
    model = serving.model_name(req.model)
    size = serving.model_info.hidden_size
    if req.dimensions is not None and req.dimensions != size:
        raise APIError(400, f"dimensions must be {size} (this model's hidden size) or omitted; shortening "
                            f"embeddings is not supported, got {req.dimensions}", param="dimensions")
    prompts = req.prompts()
    outs = await cancel_on_disconnect(raw, serving.embed(new_id("embd"), prompts, tenant=request_tenant(req.user, raw), prompt_param="input"))
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(o.embedding or [], req.encoding_format)}
                 for i, o in enumerate(outs)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
