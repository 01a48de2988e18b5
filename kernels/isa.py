"""Instruction-set strategies of the SIMD kernels, registered in one place.

Each strategy says how one instruction set does the few operations the emitters of `simd.py` and
`simd_base3.py` ask for; the emitters own the loops and layouts. `ISAS` maps a name to its
strategy; `config.ISA` picks one (TERNPOOL_ISA, else `host_isa()`), and the kernel cache is keyed by
that name. Adding an instruction set is one more `@register`ed subclass of `Isa` here (it may inherit
from one that shares most of its operations) and one parameter of tests/unit/test_isa_asm.py.

The operations, on vectors of `width` bytes (`byte_type`; 32, or 64 on zmm):
- `madd(acc, codes, x)`: acc + codes * x with codes unsigned (0..3) and x signed int8, adjacent
  products summed into the lanes of `pair_type` (int16 pairs on AVX2; the caller bounds the count of
  blocks added before `widen` so that they cannot overflow). Without `short_pairs` (VNNI: `vpdpbusd`
  sums four products straight into an int32 lane) pair_type is acc_type, `widen` does nothing and
  nothing can overflow: the emitters then add every block straight into the int32 accumulators;
- `madd_signed(acc, a, b)`: the same for a * b with both operands signed int8 in [-127, 127], but
  multiplying a + `signed_offset` (0: the plain product; 128: a is read as the unsigned byte
  a ^ 0x80, and the emitter subtracts 128 * sum(b) at the end);
- `widen(pairs)`: `pair_type` lanes into the int32 lanes of `acc_type`, the total kept;
- `base3_start(w)` / `base3_digit(state, last) -> (codes, state)`: the digit decode of the 1.6-bit
  layout (see `base3.py`), digit k of each byte of w per call.

A strategy with tiles (`amx`) also says from how many tokens a call takes its tile kernels
(`tile_tokens` for the 2-bit product, `head_tile_tokens` for the int8 head; 0: none), and `enable()`
makes the process able to run it (AMX: Linux's permission for tile data), else says why not.
"""

from __future__ import annotations

from llvmlite import binding as _llvm
from llvmlite import ir

from .llvmir import I8, I32, V16I16, V32I8, V32I16, call_intrinsic, splat

ISAS: dict[str, Isa] = {}


def register(cls):
    """Class decorator: add one instance of an `Isa` subclass to ISAS under its name."""
    if cls.name in ISAS:
        raise ValueError(f"instruction set {cls.name!r} is registered twice")
    ISAS[cls.name] = cls()
    return cls


def _host_features() -> dict:
    try:
        return dict(_llvm.get_host_cpu_features())
    except RuntimeError:  # pragma: no cover - unknown host: only ISAs that need no feature
        return {}


def missing_features(name: str, features=None) -> list[str]:
    """The CPU features the instruction set `name` needs that the host (or `features`, a mapping of
    LLVM feature names to booleans) lacks."""
    if features is None:
        features = _host_features()
    return [f for f in ISAS[name].features if not features.get(f)]


def usable_isas(features=None) -> list[str]:
    """The registered instruction sets whose CPU features the host (or `features`) has, best
    (highest priority) first."""
    if features is None:
        features = _host_features()
    usable = [isa for isa in ISAS.values() if not missing_features(isa.name, features)]
    return [isa.name for isa in sorted(usable, key=lambda isa: -isa.priority)]


def host_isa(features=None) -> str:
    """The best registered instruction set the host (or `features`) has."""
    return usable_isas(features)[0]


class Isa:
    """One instruction set: its name, the CPU features it needs, and the operations listed above."""

    name: str
    features: tuple[str, ...] = ()  # LLVM feature names the CPU must have
    priority: int = 0  # the host gets the usable one with the highest priority
    width: int = 32  # bytes per vector (columns per block of the 2-bit and int8 kernels)
    pair_type: ir.VectorType  # lanes of madd's short accumulators
    acc_type: ir.VectorType  # int32 lanes of the widened accumulators
    short_pairs: bool = True  # madd sums into short lanes, to be widened before they overflow
    chains: int = 1  # without short lanes: independent accumulators that hide madd's latency
    signed_offset: int = 0  # madd_signed multiplies a + signed_offset by b (see above)
    tile_tokens: int = 0  # 2-bit calls with at least this many tokens take the tile kernel (0: no tiles)
    head_tile_tokens: int = 0  # the same for the int8 head

    def enable(self) -> str | None:
        """Make this process able to run the instruction set (once); None when it can, else why not."""
        return None

    @property
    def byte_type(self) -> ir.VectorType:
        return ir.VectorType(I8, self.width)

    def madd_wide(self, builder, acc, a, b, signed: bool = False):
        """acc (acc_type) plus the products of one block (madd, or madd_signed), widened."""
        madd = self.madd_signed if signed else self.madd
        if not self.short_pairs:
            return madd(builder, acc, a, b)
        return builder.add(acc, self.widen(builder, madd(builder, splat(self.pair_type, 0), a, b)))

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
    subtracted from zero: 39 vector instructions per 160 weights (43 with the folded chain). The
    decode is written for any vector of bytes, so strategies of other widths inherit it."""

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
        return [builder.xor(w, splat(w.type, 0x80))]

    def base3_digit(self, builder, state, last):
        (x,) = state
        code = self.base3_code(builder, x)
        if last:
            return code, state
        x3 = builder.add(builder.add(x, x), x)  # behind an empty asm (no instruction), see above
        reg = "x" if x.type.count <= 32 else "v"  # "v": any zmm register
        return code, [builder.asm(ir.FunctionType(x.type, [x.type]), "", f"={reg},0", [x3], side_effect=False)]

    def base3_code(self, builder, x):
        """The digit [x' > -43] + [x' > 42] of the state x': two vpcmpgtb (-1 when true) subtracted
        from zero."""
        zero = splat(x.type, 0)
        ge86 = builder.sext(builder.icmp_signed(">", x, splat(x.type, -43)), x.type)  # 0 or -1
        ge171 = builder.sext(builder.icmp_signed(">", x, splat(x.type, 42)), x.type)
        return builder.sub(builder.sub(zero, ge86), ge171)


@register
class AvxVnni(Avx2):
    """VNNI on ymm (AVX-VNNI of client CPUs from Alder Lake on, `{vex} vpdpbusd`): one `vpdpbusd`
    adds the four u8 x s8 products of each int32 lane into it, so no int16 pairs, nothing to widen,
    nothing to overflow. VNNI has no signed x signed byte product (`vpdpbssd` is AVX-VNNI-INT8 only):
    the signed product multiplies a ^ 0x80 (a + 128 as an unsigned byte) by b and the emitter
    subtracts 128 * sum(b) (`signed_offset`). The base-3 decode is AVX2's, at this width."""

    name = "avxvnni"
    features = ("avxvnni",)
    priority = 20
    pair_type = acc_type = ir.VectorType(I32, 8)
    short_pairs = False
    chains = 8  # vpdpbusd: latency 4-5 cycles, 1 or 2 per cycle
    signed_offset = 128

    def madd(self, builder, acc, codes, x):
        ops = [builder.bitcast(v, self.acc_type) for v in (codes, x)]
        return call_intrinsic(builder, f"llvm.x86.avx512.vpdpbusd.{8 * self.width}", self.acc_type, [acc, *ops])

    def madd_signed(self, builder, acc, a, b):
        return self.madd(builder, acc, builder.xor(a, splat(a.type, 0x80)), b)

    def widen(self, builder, pairs):
        return pairs


@register
class Avx512Vnni(AvxVnni):
    """AVX-512 VNNI (Ice Lake server and later Xeons, AMD Zen 4 and later): `vpdpbusd` on zmm, 64
    u8 x s8 products per instruction; blocks of 64 columns (two blocks of the base-3 layout)."""

    name = "avx512vnni"
    features = ("avx512bw", "avx512vnni")
    priority = 30
    width = 64
    pair_type = acc_type = ir.VectorType(I32, 16)

    def base3_code(self, builder, x):
        """The digit with mask registers: vpcmpgtb into a mask, 1 under it (zeroing the rest), then 2
        under the mask of x' > 42 (4 instructions, against 5 with vpmovm2b)."""
        ge86 = builder.icmp_signed(">", x, splat(x.type, -43))
        ge171 = builder.icmp_signed(">", x, splat(x.type, 42))
        return builder.select(ge171, splat(x.type, 2), builder.select(ge86, splat(x.type, 1), splat(x.type, 0)))


@register
class Amx(Avx512Vnni):
    """AMX int8 tiles (Sapphire Rapids and later Xeons): calls of at least `tile_tokens` tokens of the
    2-bit layout run on `tdpbusd` tiles (`amx.py`, `ternary_amx.py`: 16 weight rows x 16 tokens x 64
    columns per instruction), int8 head calls of at least `head_tile_tokens` on `tdpbssd` tiles
    (`head8_amx.py`); fewer tokens and the 1.6-bit layout run AVX-512 VNNI's code, inherited. Linux must grant the process tile data first (`enable`); when it refuses,
    `config` falls back to the next instruction set with a warning."""

    name = "amx"
    features = ("avx512bw", "avx512vnni", "amx-tile", "amx-int8")
    priority = 40
    tile_tokens = 16  # measured with tests/tools/isa_ab.py: tiles about even at 8 tokens, 1.5-2.2x at 16
    head_tile_tokens = 4  # the head reads 328 MB whatever the tokens: tiles 1.2x at 2 tokens, 1.5x at 4

    def enable(self):
        from .amx import request_permission

        return request_permission()


class SignedBytes:
    """A mixin for VNNI strategies whose CPU multiplies signed by signed bytes: `vpdpbssd` (AVX-VNNI-INT8
    on ymm; AVX10.2 also on zmm) adds the four s8 x s8 products of each int32 lane into it, so the
    int8 head's product needs neither the a ^ 0x80 nor the 128 * sum(b) correction
    (`signed_offset` 0). Everything else is the VNNI strategy's it is mixed into."""

    signed_offset = 0

    def madd_signed(self, builder, acc, a, b):
        ops = [builder.bitcast(v, self.acc_type) for v in (a, b)]
        name = "llvm.x86.avx2.vpdpbssd.256" if self.width == 32 else f"llvm.x86.avx10.vpdpbssd.{8 * self.width}"
        return call_intrinsic(builder, name, self.acc_type, [acc, *ops])


@register
class AvxVnniInt8(SignedBytes, AvxVnni):
    """AVX-VNNI with AVX-VNNI-INT8 (Lunar Lake, Arrow Lake and later clients; Sierra Forest and later
    E-core Xeons): AVX-VNNI, with `vpdpbssd` for the int8 head. Above AVX-VNNI, below AVX-512 VNNI
    (a CPU with both runs the ternary kernels faster on zmm)."""

    name = "avxvnniint8"
    features = ("avxvnni", "avxvnniint8")
    priority = 25


@register
class Avx10_2(SignedBytes, Avx512Vnni):
    """AVX10.2 (Diamond Rapids and later Xeons): AVX-512 VNNI, with `vpdpbssd` on zmm for the int8
    head."""

    name = "avx10.2"
    features = ("avx512bw", "avx512vnni", "avx10.2")
    priority = 35
