"""ternpool.kernels: Numba kernels with NumPy references. Knows arrays, not models."""

from .attention import attention, attention_ref
from .bf16 import bf16_matmul, bf16_matmul_ref, bf16_to_f32, f32_to_bf16
from .config import set_threads
from .quantize import quantize_rows, quantize_rows_ref
from .ternary import (
    dequant_factors,
    pack_ternary,
    ternary_linear,
    ternary_linears,
    ternary_linear_ref,
    ternary_matmul,
    ternary_matmul_ref,
    unpack_ternary,
)

__all__ = [
    "attention", "attention_ref", "bf16_matmul", "bf16_matmul_ref", "bf16_to_f32", "f32_to_bf16",
    "dequant_factors", "set_threads", "quantize_rows", "quantize_rows_ref", "pack_ternary", "ternary_linear",
    "ternary_linears", "ternary_linear_ref", "ternary_matmul", "ternary_matmul_ref", "unpack_ternary",
]

from .base3 import base3_linear, base3_linear_ref, base3_matmul, base3_matmul_ref, pack_base3, unpack_base3  # noqa: E402

__all__ += ["base3_linear", "base3_linear_ref", "base3_matmul", "base3_matmul_ref", "pack_base3", "unpack_base3"]
