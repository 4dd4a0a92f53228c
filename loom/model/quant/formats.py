"""The weight formats loom keeps quantized, and what ``--quantization`` may name.

Every format is stored in one packed layout (:class:`loom.model.quant.packed.PackedWeight`):
``bits``-bit codes in groups of ``group`` elements that share an fp16 scale and, unless the format
is symmetric, an fp16 min. GGUF's block formats map onto it exactly, except that the K-quants'
6-bit sub-block scales are expanded to one fp16 scale (and min) per group."""

from __future__ import annotations

from dataclasses import dataclass

PER_CHANNEL = 0  # ``group`` of a format with one scale per output row
BLOCK = 32  # elements per block of codes (and of int8 activations in the kernel)


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int  # 4, 5, 6 or 8
    group: int  # elements per scale: 16, a multiple of 32, or PER_CHANNEL
    symmetric: bool  # no min: w = scale * (code - offset)
    description: str

    @property
    def offset(self) -> int:
        """The code of zero in a symmetric format (8-bit codes are stored signed)."""
        return 1 << (self.bits - 1) if self.symmetric and self.bits < 8 else 0

    def group_for(self, in_features: int) -> int:
        return in_features if self.group == PER_CHANNEL else self.group

    def fits(self, in_features: int) -> bool:
        """Whether rows of ``in_features`` split into whole blocks and whole groups."""
        return in_features % BLOCK == 0 and in_features % self.group_for(in_features) == 0


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q4_0", 4, 32, True, "GGUF Q4_0: 4-bit, groups of 32, scale only"),
        QuantFormat("q4_1", 4, 32, False, "GGUF Q4_1: 4-bit, groups of 32, scale and min"),
        QuantFormat("q5_0", 5, 32, True, "GGUF Q5_0: 5-bit, groups of 32, scale only"),
        QuantFormat("q5_1", 5, 32, False, "GGUF Q5_1: 5-bit, groups of 32, scale and min"),
        QuantFormat("q8_0", 8, 32, True, "GGUF Q8_0: 8-bit, groups of 32"),
        QuantFormat("q4_k", 4, 32, False, "GGUF Q4_K: 4-bit, groups of 32, scale and min"),
        QuantFormat("q5_k", 5, 32, False, "GGUF Q5_K: 5-bit, groups of 32, scale and min"),
        QuantFormat("q6_k", 6, 16, True, "GGUF Q6_K: 6-bit, groups of 16, scale only"),
        QuantFormat("int8", 8, PER_CHANNEL, True, "8-bit, one scale per output channel"),
        QuantFormat("int4", 4, 32, False, "4-bit, groups of 32, asymmetric"),
        QuantFormat("int4_g128", 4, 128, False, "4-bit, groups of 128, asymmetric"),
        QuantFormat("int4_sym", 4, 32, True, "4-bit, groups of 32, symmetric"),
        QuantFormat("w4a8", 4, 128, True, "4-bit, groups of 128, symmetric (QServe/Atom's W4A8 weights)"),
    )
}
AUTO = "auto"  # GGUF tensors keep their own type; other checkpoints stay in the compute dtype
NONE = "none"  # everything in the compute dtype (GGUF tensors dequantized at load)
QUANTIZATION_CHOICES = (AUTO, NONE, *FORMATS)
