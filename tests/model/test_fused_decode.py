"""The native decode stack (``loom.model.fused_decode``) computes what the module-by-module forward
computes: the same kernels in the same order, so the same tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from loom.engine import LLM
from loom.model.kernels import native_ops
from loom.model.layers import Linear
from loom.model.quant.formats import FORMATS
from loom.model.quant.packed import PackedWeight
from loom.model.weights import iter_weights
from loom.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    native_ops() is None or not native_ops().has_quant_matmul(), reason="native kernels not built (needs AVX2)"
)

# Different lengths, so the decode rows of one step see different contexts and block counts.
PROMPTS = [[5, 900, 77, 1203, 42, 8, 311], [17, 2000, 3, 3, 640], list(range(100, 160)), [7]]
PARAMS = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)


def run(llm: LLM) -> tuple[list[list[int]], torch.Tensor]:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = torch.tensor([lp.logprob for o in outs for lp in o.outputs[0].logprobs])
    return tokens, logprobs


def assert_fused_matches_modules(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode steps run on the native stack, and give the tokens and logprobs the modules give."""
    fused_tokens, fused_logprobs = run(llm)
    assert llm.engine.worker.model.fused is not None
    monkeypatch.setenv("LOOM_DISABLE_FUSED_DECODE", "1")
    tokens, logprobs = run(llm)
    assert fused_tokens == tokens
    torch.testing.assert_close(fused_logprobs, logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "quantization", "dtype"), [
    ("llama", "none", "float32"),
    ("llama", "q4_1", "float32"),
    ("qwen2", "q8_0", "float32"),  # q/k/v biases, untied head
    ("qwen2", "none", "bfloat16"),  # the small-batch bf16 linear for dense weights
])
def test_fused_decode_matches_the_module_forward(tiny_model, monkeypatch, arch, quantization, dtype):
    llm = LLM(str(tiny_model(arch)), quantization=quantization, dtype=dtype)
    assert_fused_matches_modules(llm, monkeypatch)


def test_disabled_fused_decode_is_never_built(tiny_model, monkeypatch):
    monkeypatch.setenv("LOOM_DISABLE_FUSED_DECODE", "1")
    llm = LLM(str(tiny_model("llama")))
    run(llm)
    assert llm.engine.worker.model.fused is None


def test_torch_attention_backend_runs_the_modules(tiny_model):
    llm = LLM(str(tiny_model("llama")), attention_backend="torch")
    run(llm)
    assert llm.engine.worker.model.fused is None


def test_projection_of_mixed_formats_matches_the_linear():
    """A Q4_K_M-style fused q/k/v: q and k in one format, v in another, plus a bias."""
    ops = native_ops()
    parts = [PackedWeight.quantize(torch.randn(64, 96), FORMATS["q4_k" if i < 2 else "q6_k"]) for i in range(3)]
    lin = Linear(96, 192, bias=True)
    lin.bias.copy_(torch.randn(192))
    lin.set_packed(parts)
    assert len(lin.packed) == 2
    projection = ops.Projection([p._kernel_args for p in lin.packed], None, lin.bias)
    x = torch.randn(3, 96)
    torch.testing.assert_close(projection(x), lin(x), atol=0, rtol=0)
    dense = Linear(96, 192)
    dense.weight.normal_()
    torch.testing.assert_close(ops.Projection([], dense.weight, None)(x), dense(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="packed or dense"):
        ops.Projection([], None, None)


def test_mixed_format_model_decodes_on_the_stack(tiny_model, monkeypatch):
    """Q4_K q/k next to Q6_K v (as Q4_K_M files store them) through the whole engine."""
    path = tiny_model("llama")
    mixed = {"self_attn.q_proj": "q4_k", "self_attn.k_proj": "q4_k", "self_attn.v_proj": "q6_k"}
    original = iter_weights

    def weights(*args, **kwargs):
        for name, t in original(*args, **kwargs):
            kind = next((k for k in mixed if f".{k}." in name), None)
            yield name, PackedWeight.quantize(t.float(), FORMATS[mixed[kind]]) if kind else t

    monkeypatch.setattr("loom.model.worker.iter_weights", weights)
    llm = LLM(str(path), dtype="float32")
    assert [p.fmt.name for p in llm.engine.worker.model.layers[0].self_attn.qkv_proj.packed] == ["q4_k", "q6_k"]
    assert_fused_matches_modules(llm, monkeypatch)


@pytest.mark.parametrize("kv_cache_dtype", ["int4", "int2"])
def test_fused_decode_over_a_kivi_cache_matches_the_module_forward(monkeypatch, kv_cache_dtype):
    """The default model (head_dim 64, which the KIVI kernel serves), with a residual of 16 tokens so
    that the decode steps seal groups on the stack. Without prefix caching, so that the second run
    computes its prompts as the first did: in bf16, a prompt batched otherwise rounds differently and
    a quantized cache can turn that into another code."""
    llm = LLM(None, kv_cache_dtype=kv_cache_dtype, kv_residual_tokens=16, enable_prefix_caching=False)
    assert_fused_matches_modules(llm, monkeypatch)
