"""The read-bandwidth kernel sums exactly (it is the bench's yardstick, so a wrong sum would be a wrong
ceiling), and a decode faster than the ceiling is reported as a bandwidth measurement too low, never as
a fraction of the ceiling above 1."""

from __future__ import annotations

import re

import numpy as np
import pytest
from llvmlite import ir

from ternpool.cluster.cli.bench import decode_line
from ternpool.engine.bench import decode_ceiling
from ternpool.kernels.bandwidth import BLOCK, PART, byte_sum, byte_sum_ref, emit_byte_sum, read_bandwidth
from ternpool.kernels.isa import ISAS
from ternpool.kernels.llvmir import BYTE_PTR, I32, I64

from helpers import assembly, assert_same_with_any_thread_count, readonly

pytestmark = pytest.mark.unit

# empty, below one 32-byte load, around a block of the intrinsic, around a parallel part, many parts
SIZES = [0, 1, 31, 33, BLOCK - 1, BLOCK, BLOCK + 1, 64 * BLOCK + 5, PART - 1, PART, PART + 127, 3 * PART + 1001]


@pytest.mark.parametrize("n", SIZES)
def test_byte_sum_is_exact_on_odd_sizes(n):
    a = np.random.default_rng(n).integers(0, 256, size=n, dtype=np.uint8)
    assert byte_sum(a) == byte_sum_ref(a)


def test_byte_sum_does_not_overflow_on_all_255():
    """The largest bytes everywhere: 16-bit lanes for 64 blocks, int32 per part, int64 in total."""
    a = np.full(2 * PART + 77, 255, dtype=np.uint8)
    assert byte_sum(a) == 255 * a.size == byte_sum_ref(a)


def test_byte_sum_reads_views_and_read_only_arrays_and_refuses_others():
    a = np.random.default_rng(1).integers(0, 256, size=5000, dtype=np.uint8)
    assert byte_sum(readonly(a)) == byte_sum_ref(a)
    assert byte_sum(a[7:4001]) == byte_sum_ref(a[7:4001])  # an unaligned start
    assert_same_with_any_thread_count(lambda x: np.array([byte_sum(x)]), a)
    for bad in (a.astype(np.int16), a.reshape(50, 100), a[::2]):
        with pytest.raises(ValueError, match="C-contiguous 1-D uint8"):
            byte_sum(bad)


def test_read_bandwidth_reports_its_measurement():
    r = read_bandwidth(nbytes=8 * PART + 3, passes=2, threads=1)
    assert r["bytes_per_s"] >= r["median_bytes_per_s"] > 0
    assert (r["buffer_bytes"], r["passes"], r["threads"]) == (8 * PART + 3, 2, 1)
    with pytest.raises(ValueError, match="passes"):
        read_bandwidth(nbytes=100, passes=0)


def test_decode_below_the_ceiling_is_a_fraction_of_it():
    r = decode_ceiling(decode_tokens_per_s=20.0, bytes_per_token=500_000_000, read_bandwidth=20e9)
    assert r["ceiling_tokens_per_s"] == pytest.approx(40.0)
    assert r["fraction_of_ceiling"] == pytest.approx(0.5) and r["bandwidth_low_by"] is None
    assert r["decode_read_bytes_per_s"] == pytest.approx(10e9)
    line = decode_line({"decode_tokens_per_s": 20.0, "bytes_per_token": 500_000_000, "read_bandwidth": 20e9, **r})
    assert line.endswith("(0.50 of it)") and "too low" not in line


def test_decode_above_the_ceiling_flags_the_bandwidth_measurement():
    """The case seen on an EPYC: 10.8 GB/s measured, then a decode that read 2.41x that."""
    per_token = 850_000_000
    decode = 2.41 * 10.8e9 / per_token
    r = decode_ceiling(decode_tokens_per_s=decode, bytes_per_token=per_token, read_bandwidth=10.8e9)
    assert r["fraction_of_ceiling"] is None
    assert r["bandwidth_low_by"] == pytest.approx(2.41)
    line = decode_line({"decode_tokens_per_s": decode, "bytes_per_token": per_token, "read_bandwidth": 10.8e9, **r})
    assert "bandwidth measurement was too low, by at least 2.41x" in line and "of it)" not in line
    assert "26.0 GB/s" in line  # what the decode itself read
    # exactly at the ceiling is still possible
    at = decode_ceiling(decode_tokens_per_s=10.0, bytes_per_token=2, read_bandwidth=20.0)
    assert at["fraction_of_ceiling"] == pytest.approx(1.0) and at["bandwidth_low_by"] is None


def test_decode_ceiling_refuses_nonsense():
    with pytest.raises(ValueError, match="positive"):
        decode_ceiling(1.0, 0, 1e9)
    with pytest.raises(ValueError, match="positive"):
        decode_ceiling(1.0, 100, 0.0)


@pytest.mark.parametrize("cpu,width", [("haswell", "ymm"), ("znver4", "zmm"), ("sapphirerapids", "zmm")])
def test_byte_sum_loop_widens_whole_vectors_on_named_cpus(cpu, width):
    """The hot loop, compiled for a named CPU whatever runs the tests: bytes widened straight from
    memory to 16-bit lanes (`vpmovzxbw`) and added (`vpaddw`) in full vector registers, no scalar
    loads."""
    module = ir.Module(name="bandwidth")
    fn = ir.Function(module, ir.FunctionType(I32, [BYTE_PTR, I64]), "byte_sum")
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    builder.ret(emit_byte_sum(builder, ISAS["generic"], *fn.args))
    asm = assembly(module, cpu)
    assert re.search(rf"vpmovzxbw\s+-?\d*\(%\w+(,%\w+)?\), %{width}", asm), asm
    assert re.search(rf"vpaddw\s+%{width}", asm), asm
    assert not re.search(r"movzbl|movzbw", asm), asm
