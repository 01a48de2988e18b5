"""Instruction-set strategies of the SIMD kernels, registered in one place.

Each strategy says how one instruction set does the few operations the emitters of `simd.py` and
`simd_base3.py` ask for; the emitters own the loops and layouts. `ISAS` maps a name to its
strategy; `config.ISA` picks one (TERNPOOL_ISA, else `host_isa()`), and the kernel cache is keyed by
that name. Adding an instruction set is one more `@register`ed subclass of `Isa` here (it may inherit
from one that shares most of its operations) and one parameter of tests/unit/test_isa_asm.py.

The operations, on 32-byte blocks (`V32I8`):
- `madd(acc, codes, x)`: acc + codes * x with codes unsigned (0..3) and x signed int8, adjacent
  products summed into the lanes of `pair_type` (int16 pairs on AVX2; the caller bounds the count of
  blocks added before `widen` so that they cannot overflow);
- `madd_signed(acc, a, b)`: the same with both operands signed int8 in [-127, 127];
- `widen(pairs)`: `pair_type` lanes into the int32 lanes of `acc_type`, the total kept;
- `base3_start(w)` / `base3_digit(state, last) -> (codes, state)`: the digit decode of the 1.6-bit
  layout (see `base3.py`), digit k of each byte of w per call.
"""

from __future__ import annotations

from llvmlite import binding as _llvm
from llvmlite import ir

from .llvmir import I32, V16I16, V32I8, V32I16, call_intrinsic, splat

ISAS: dict[str, Isa] = {}


def register(cls):
    """Class decorator: add one instance of an `Isa` subclass to ISAS under its name."""
    if cls.name in ISAS:
        raise ValueError(f"instruction set {cls.name!r} is registered twice")
    ISAS[cls.name] = cls()
    return cls


def usable_isas(features=None) -> list[str]:
    """The registered instruction sets whose CPU features the host (or `features`, a mapping of LLVM
    feature names to booleans) has, best (highest priority) first."""
    if features is None:
        try:
            features = _llvm.get_host_cpu_features()
        except RuntimeError:  # pragma: no cover - unknown host: only ISAs that need no feature
            features = {}
    usable = [isa for isa in ISAS.values() if all(features.get(f) for f in isa.features)]
    return [isa.name for isa in sorted(usable, key=lambda isa: -isa.priority)]


def host_isa(features=None) -> str:
    """The best registered instruction set the host (or `features`) has."""
    return usable_isas(features)[0]


class Isa:
    """One instruction set: its name, the CPU features it needs, and the operations listed above."""

    name: str
    features: tuple[str, ...] = ()  # LLVM feature names the CPU must have
    priority: int = 0  # the host gets the usable one with the highest priority
    pair_type: ir.VectorType  # lanes of madd's short accumulators
    acc_type: ir.VectorType  # int32 lanes of the widened accumulators

    def madd(self, builder, acc, codes, x):
        raise NotImplementedError

    def madd_signed(self, builder, acc, a, b):
        raise NotImplementedError

    def widen(self, builder, pairs):
        raise NotImplementedError

    def base3_start(self, builder, w) -> list:
        raise NotImplementedError

    def base3_digit(self, builder, state: list, last: bool):
        raise NotImplementedError


@register
class Generic(Isa):
    """Plain vector IR on 16-bit lanes, for any LLVM target (any x86-64 CPU)."""

    name = "generic"
    pair_type = V32I16
    acc_type = ir.VectorType(I32, 32)

    def madd(self, builder, acc, codes, x):
        if codes.type != V32I16:  # the base-3 decode below leaves its codes in 16-bit lanes already
            codes = builder.zext(codes, V32I16)
        return builder.add(acc, builder.mul(codes, builder.sext(x, V32I16)))

    def madd_signed(self, builder, acc, a, b):
        return builder.add(acc, builder.mul(builder.sext(a, V32I16), builder.sext(b, V32I16)))

    def widen(self, builder, pairs):
        return builder.sext(pairs, self.acc_type)

    def base3_start(self, builder, w):
        return [builder.zext(w, V32I16)]

    def base3_digit(self, builder, state, last):
        (x,) = state  # t = 3x; digit = t >> 8; x = t & 255
        t = builder.mul(x, splat(V32I16, 3))
        code = builder.lshr(t, splat(V32I16, 8))  # 0, 1 or 2, kept in 16-bit lanes
        if last:
            return code, state
        return code, [builder.and_(t, splat(V32I16, 255))]


@register
class Avx2(Isa):
    """`vpmaddubsw` (u8 x s8 -> int16 pairs) and `vpmaddwd` against ones (-> int32); the signed
    product through `vpsignb` (|a| as unsigned times sign(a) * b); the base-3 decode on bytes.

    Base-3 decode without the 16-bit multiply-high of the textbook decode: with x' = x ^ 0x80
    (x - 128 as a signed byte), 3x' = 3x - 128 (mod 256), so the state stays in the signed domain
    under `x' <- x' + x' + x'` (two vpaddb; an empty inline asm keeps LLVM from folding the chain
    into x' * 9, * 27, * 81, which costs 3 to 5 instructions each on bytes), and the digit
    (3x) >> 8 = [x >= 86] + [x >= 171] = [x' > -43] + [x' > 42] is two vpcmpgtb (-1 when true)
    subtracted from zero: 39 vector instructions per 160 weights (43 with the folded chain)."""

    name = "avx2"
    features = ("avx2",)
    priority = 10
    pair_type = V16I16
    acc_type = ir.VectorType(I32, 8)

    def madd(self, builder, acc, codes, x):
        return builder.add(acc, call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [codes, x]))

    def madd_signed(self, builder, acc, a, b):
        zero = splat(V32I8, 0)
        abs_a = builder.select(builder.icmp_signed("<", a, zero), builder.sub(zero, a), a)  # vpabsb
        signed_b = call_intrinsic(builder, "llvm.x86.avx2.psign.b", V32I8, [b, a])  # sign(a) * b
        return builder.add(acc, call_intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, [abs_a, signed_b]))

    def widen(self, builder, pairs):
        return call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", self.acc_type, [pairs, splat(V16I16, 1)])

    def base3_start(self, builder, w):
        return [builder.xor(w, splat(V32I8, 0x80))]

    def base3_digit(self, builder, state, last):
        (x,) = state
        zero = splat(V32I8, 0)
        ge86 = builder.sext(builder.icmp_signed(">", x, splat(V32I8, -43)), V32I8)  # 0 or -1
        ge171 = builder.sext(builder.icmp_signed(">", x, splat(V32I8, 42)), V32I8)
        code = builder.sub(builder.sub(zero, ge86), ge171)
        if last:
            return code, state
        x3 = builder.add(builder.add(x, x), x)  # behind an empty asm (no instruction), see above
        return code, [builder.asm(ir.FunctionType(V32I8, [V32I8]), "", "=x,0", [x3], side_effect=False)]
