"""Every registered instruction-set strategy, compiled for a named CPU: the emitters of the SIMD
kernels go into a bare llvmlite module, through LLVM's -O3 pipeline, and the assembly must hold the
instructions the strategy exists for, whatever CPU runs the tests.

Adding an instruction set adds one row to ASM_EXPECTATIONS (a CPU that has it, the instructions it
must produce, and those it must not; "vpdpbusd:zmm" is a vpdpbusd with a zmm operand)."""

from __future__ import annotations

import re

import pytest
from llvmlite import binding, ir
from ternpool.kernels.amx import (
    dequantized,
    emit_store_tile,
    emit_tile_config,
    emit_tile_dots,
    emit_tile_release,
    emit_unpack_row,
)
from ternpool.kernels.isa import ISAS, host_isa, missing_features, usable_isas
from ternpool.kernels.llvmir import BYTE_PTR, I32, I64, i64
from ternpool.kernels.simd import emit_dot4, emit_dot_s8
from ternpool.kernels.simd_base3 import emit_dot_base3

pytestmark = pytest.mark.unit

_AVX2 = {"vpmaddubsw", "vpmaddwd", "vpsignb"}  # what VNNI replaces
_ZMM_VNNI = ({"vpdpbusd:zmm", "vpcmpgtb"}, {"vpdpbusd:ymm", "vpmovm2b"} | _AVX2)
_AMX = {"ldtilecfg", "tilezero", "tileloadd", "tdpbusd", "tdpbssd", "tilestored", "tilerelease", "vdivps:zmm"}

# (isa, cpu, instructions that must appear, instructions that must not)
ASM_EXPECTATIONS = [
    ("avx2", "haswell", _AVX2 | {"vpcmpgtb"}, set()),
    ("avx2", "znver3", _AVX2 | {"vpcmpgtb"}, set()),
    ("generic", "x86-64", {"pmullw"}, {"vpmaddubsw", "pmaddubsw", "vpsignb"}),
    ("avxvnni", "alderlake", {"vpdpbusd:ymm", "vpcmpgtb"}, {"vpdpbusd:zmm"} | _AVX2),
    ("avx512vnni", "znver4", *_ZMM_VNNI),
    ("avx512vnni", "icelake-server", *_ZMM_VNNI),
    ("avx512vnni", "sapphirerapids", *_ZMM_VNNI),
    ("amx", "sapphirerapids", _ZMM_VNNI[0] | _AMX, _ZMM_VNNI[1]),
    # vpdpbssd (signed x signed) in the int8 head, vpdpbusd in the ternary kernels
    ("avxvnniint8", "arrowlake", {"vpdpbssd:ymm", "vpdpbusd:ymm", "vpcmpgtb"}, {"vpdpbusd:zmm", "vpdpbssd:zmm"} | _AVX2),
    ("avxvnniint8", "lunarlake", {"vpdpbssd:ymm", "vpdpbusd:ymm", "vpcmpgtb"}, {"vpdpbusd:zmm", "vpdpbssd:zmm"} | _AVX2),
    ("avxvnniint8", "sierraforest", {"vpdpbssd:ymm", "vpdpbusd:ymm", "vpcmpgtb"}, {"vpdpbusd:zmm", "vpdpbssd:zmm"} | _AVX2),
    ("avx10.2", "diamondrapids", _ZMM_VNNI[0] | {"vpdpbssd:zmm"}, _ZMM_VNNI[1] | {"vpdpbssd:ymm"}),
]


def _kernel(module, name, nptr, emit):
    """void name(i8* ptrs[nptr]..., i64 n, i64 m, i32* out): out[k] = k-th sum of emit(builder, ptrs, n, m)."""
    fnty = ir.FunctionType(ir.VoidType(), [BYTE_PTR] * nptr + [I64, I64, I32.as_pointer()])
    fn = ir.Function(module, fnty, name)
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    *ptrs, n, m, out = fn.args
    for k, s in enumerate(emit(builder, ptrs, n, m)):
        builder.store(s, builder.gep(out, [i64(k)]))
    builder.ret_void()


def _tiles(builder, ptrs, n, m):
    """The AMX tile kernel's steps (amx.py): configure, unpack a packed row of n bytes into 4 rows of
    codes, 2 x 2 tile products over n // 64 steps into ptrs[2] (unsigned x signed, and signed x signed as
    the int8 head's), one C tile dequantized, release; no sums."""
    packed, codes, c = ptrs
    emit_tile_config(builder)
    emit_unpack_row(builder, packed, n, [builder.gep(codes, [builder.mul(m, i64(i))]) for i in range(4)])
    emit_tile_dots(builder, [codes, builder.gep(codes, [builder.mul(m, i64(16))])], m, [packed, packed], 1024,
                   builder.sdiv(n, i64(64)), c)
    emit_tile_dots(builder, [packed, codes], m, [codes], 1024, n, c, signed=True)  # the int8 head's
    emit_store_tile(builder, c, codes, m, dequantized(builder, packed, packed, ir.Constant(ir.FloatType(), 1.0), True))
    emit_tile_release(builder)
    return []


KERNELS = {  # name: (pointer arguments, emitter)
    "dot4_tile2": (3, lambda isa, b, p, n, m: emit_dot4(b, isa, p[0], p[1:], n)),
    "dot_s8_tile2": (3, lambda isa, b, p, n, m: emit_dot_s8(b, isa, p[0], p[1:], [b.trunc(m, I32)] * 2, n)),
    "dot_base3_4": (5, lambda isa, b, p, n, m: emit_dot_base3(b, isa, p[:1], p[1:], n, m)),
    "dot_base3_rows4": (5, lambda isa, b, p, n, m: emit_dot_base3(b, isa, p[:4], p[4:], n, m)),
}


def _assembly(isa, cpu: str, kernels=tuple(KERNELS)) -> str:
    module = ir.Module(name=f"ternpool_{isa.name}")
    module.triple = "x86_64-unknown-linux-gnu"
    for name in kernels:
        nptr, emit = KERNELS[name]
        _kernel(module, name, nptr, lambda b, p, n, m, emit=emit: emit(isa, b, p, n, m))
    if isa.tile_tokens:
        _kernel(module, "amx_tiles", 3, lambda b, p, n, m: _tiles(b, p, n, m))
    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    target = binding.Target.from_triple(module.triple)
    machine = target.create_target_machine(cpu=cpu, opt=3)
    llmod = binding.parse_assembly(str(module))
    llmod.verify()
    builder = binding.create_pass_builder(machine, binding.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(llmod, builder)
    return machine.emit_assembly(llmod)


def _instructions(asm: str) -> set[str]:
    """The mnemonics of `asm`, and "mnemonic:xmm" (ymm, zmm) for each register width they use."""
    found = set()
    for m in re.finditer(r"^\s+(?:\{vex\}\s+)?([a-z][a-z0-9]*)\s(.*)$", asm, re.MULTILINE):
        found.add(m.group(1))
        found |= {f"{m.group(1)}:{reg}" for reg in re.findall(r"%([xyz]mm)\d+", m.group(2))}
    return found


@pytest.mark.parametrize("name,cpu,present,absent", ASM_EXPECTATIONS)
def test_strategy_compiles_to_its_instructions(name, cpu, present, absent):
    found = _instructions(_assembly(ISAS[name], cpu))
    assert present <= found, f"{name} on {cpu}: missing {sorted(present - found)}"
    assert not absent & found, f"{name} on {cpu}: unexpected {sorted(absent & found)}"


@pytest.mark.parametrize("name,cpu", [(row[0], row[1]) for row in ASM_EXPECTATIONS if row[0] in ("avxvnniint8", "avx10.2")])
def test_int8_head_multiplies_signed_bytes_without_the_offset(name, cpu):
    """Where the CPU has vpdpbssd the head's signed product is that one instruction, not vpdpbusd
    on a ^ 0x80 with the 128 * sum(b) correction."""
    assert ISAS[name].signed_offset == 0
    found = _instructions(_assembly(ISAS[name], cpu, ["dot_s8_tile2"]))
    assert "vpdpbssd" in found and "vpdpbusd" not in found, sorted(found)


def test_every_registered_strategy_has_an_assembly_check():
    assert set(ISAS) == {row[0] for row in ASM_EXPECTATIONS}


def test_host_gets_the_best_strategy_it_has_the_features_for():
    assert host_isa({"avx2": True, "fma": True}) == "avx2"
    assert host_isa({"avx2": False, "sse2": True}) == "generic"
    assert host_isa({}) == "generic"
    assert usable_isas({"avx2": True}) == ["avx2", "generic"]
    zen4 = {"avx2": True, "avx512f": True, "avx512bw": True, "avx512vnni": True, "avxvnni": False}
    assert usable_isas(zen4) == ["avx512vnni", "avx2", "generic"]
    spr = dict(zen4, **{"avxvnni": True, "amx-tile": True, "amx-int8": True})
    assert usable_isas(spr) == ["amx", "avx512vnni", "avxvnni", "avx2", "generic"]
    assert missing_features("amx", zen4) == ["amx-tile", "amx-int8"]
    assert host_isa({"avx2": True, "avxvnni": True}) == "avxvnni"
    assert missing_features("avx512vnni", {"avx2": True, "avx512bw": True}) == ["avx512vnni"]
    arrowlake = {"avx2": True, "avxvnni": True, "avxvnniint8": True, "avx512vnni": False}
    assert usable_isas(arrowlake) == ["avxvnniint8", "avxvnni", "avx2", "generic"]
    assert host_isa({**arrowlake, "avx512bw": True, "avx512vnni": True}) == "avx512vnni"  # zmm first
    diamondrapids = {**zen4, "avxvnni": True, "avxvnniint8": True, "avx10.2": True}
    assert usable_isas(diamondrapids)[:3] == ["avx10.2", "avx512vnni", "avxvnniint8"]
    assert missing_features("avxvnniint8", {"avxvnni": True}) == ["avxvnniint8"]


def test_unknown_isa_is_refused_naming_the_registered_ones():
    import os
    import subprocess
    import sys

    env = dict(os.environ, TERNPOOL_ISA="sse9")
    r = subprocess.run([sys.executable, "-c", "import ternpool.kernels.config"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "TERNPOOL_ISA must be one of" in r.stderr and "'avx2'" in r.stderr and "'sse9'" in r.stderr, r.stderr


# The lookup-table kernel (kernels/lut.py) has no instruction of its own per strategy, only the width:
# its lookups must be int16 vector adds of that width, with the table row as a memory operand (AVX).
LUT_EXPECTATIONS = [
    ("avx512vnni", "sapphirerapids", {"vpaddw:zmm"}, {"vpaddw:ymm"}),
    ("avx512vnni", "znver4", {"vpaddw:zmm"}, {"vpaddw:ymm"}),
    ("avx2", "haswell", {"vpaddw:ymm"}, {"vpaddw:zmm"}),
    ("generic", "x86-64", {"paddw:xmm"}, {"vpaddw"}),
]


def _lut_assembly(isa, cpu: str) -> str:
    from ternpool.kernels.lut import emit_lut_rows, emit_offsets

    from helpers import assembly

    module = ir.Module(name=f"ternpool_lut_{isa.name}")
    vec = ir.VectorType(ir.IntType(16), isa.width // 2)
    fnty = ir.FunctionType(ir.VoidType(), [BYTE_PTR, I64, I64, BYTE_PTR, vec.as_pointer()])
    fn = ir.Function(module, fnty, "lut_rows2")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    offs, ostride, n, tab, out = fn.args
    for k, s in enumerate(emit_lut_rows(builder, isa, offs, ostride, n, tab, 2)):
        builder.store(s, builder.gep(out, [i64(k)]))
    builder.ret_void()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [BYTE_PTR, I64, I64] + [BYTE_PTR] * 4), "offsets")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    emit_offsets(builder, fn.args[0], 16, fn.args[1], fn.args[2], list(fn.args[3:]))
    builder.ret_void()
    return assembly(module, cpu)


@pytest.mark.parametrize("name,cpu,present,absent", LUT_EXPECTATIONS)
def test_lut_lookups_are_int16_adds_of_the_strategy_width(name, cpu, present, absent):
    asm = _lut_assembly(ISAS[name], cpu)
    found = _instructions(asm)
    assert present <= found, f"LUT with {name} on {cpu}: missing {sorted(present - found)}"
    assert not absent & found, f"LUT with {name} on {cpu}: unexpected {sorted(absent & found)}"
    for width in ("zmm", "ymm"):  # (SSE2's paddw takes aligned memory only: generic loads the row first)
        if f"vpaddw:{width}" in present:
            assert re.search(rf"vpaddw\s+-?\d*\(%\w+,%\w+\), %{width}", asm), "the table row must be the add's memory operand"


@pytest.mark.parametrize("name,cpu", sorted({(row[0], row[1]) for row in ASM_EXPECTATIONS}))
def test_the_2bit_kernels_prefetch_their_weights_ahead(name, cpu):
    """emit_dot4 asks for the packed bytes llvmir.PREFETCH_AHEAD ahead (batch-1 decode streams its weights)."""
    assert "prefetcht0" in _instructions(_assembly(ISAS[name], cpu, ("dot4_tile2",)))
