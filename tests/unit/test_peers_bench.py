"""tests/tools/peers_bench.py reads each peer's output into the right column and computes the target
ratios from the best rows (outputs in the peers' own formats, as their benchmark programs print them)."""
import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "peers_bench.py"


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("peers_bench", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peers_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    mod.COLUMNS[2:] = ["decode_32", "decode_64"]
    return mod


ARGS = Namespace(prompt_len=128, gen=64)


def test_llama_bench_json_gives_prefill_and_single_stream(pb):
    out = json.dumps([{"n_prompt": 128, "n_gen": 0, "avg_ts": 52.5, "model_type": "bitnet 2B TQ2_0"},
                      {"n_prompt": 0, "n_gen": 64, "avg_ts": 28.25}])
    e = pb.Entry("llama.cpp", "llama.cpp TQ2_0", [])
    assert pb.parse(e, ["bin/llama-bench", "-m", "x.gguf"], out, "", ARGS) == {"prefill": 52.5, "decode_1": 28.25}


def test_batched_bench_jsonl_gives_aggregate_decode_per_stream_count(pb):
    lines = "\n".join(["main: n_kv_max = 12544",
                       json.dumps({"pp": 128, "tg": 64, "pl": 32, "speed_pp": 40.0, "speed_tg": 38.5}),
                       json.dumps({"pp": 128, "tg": 64, "pl": 64, "speed_pp": 41.0, "speed_tg": 39.75})])
    e = pb.Entry("vlut.cpp", "vlut.cpp I2_V_4", [])
    r = pb.parse(e, ["bin/llama-batched-bench"], "", lines, ARGS)  # the lines may come on either stream
    assert r == {"decode_32": 38.5, "decode_64": 39.75}


def test_litespark_line_gives_chunked_prefill_and_decode(pb):
    out = "progress\n" + json.dumps({"engine": "litespark", "pp128": 46.0, "tg": 12.9, "pp_as_shipped": 900.0})
    e = pb.Entry("litespark", "litespark int4 head", [])
    assert pb.parse(e, ["bash", "bench.sh"], out, "", ARGS) == {"prefill": 46.0, "decode_1": 12.9}


def test_ratios_take_best_of_ours_over_best_peer_against_each_target(pb):
    ours_a, ours_b = pb.Entry("ternpool", "a", []), pb.Entry("ternpool", "b", [])
    peer_x, peer_y = pb.Entry("llama.cpp", "x", []), pb.Entry("vlut.cpp", "y", [])
    ours_a.samples.update(prefill=[70.0, 75.0], decode_1=[30.0], decode_32=[50.0])
    ours_b.samples.update(prefill=[80.0], decode_1=[20.0], decode_32=[60.0, 58.0])
    peer_x.samples.update(prefill=[40.0], decode_1=[24.0], decode_32=[38.0])
    peer_y.samples.update(prefill=[50.0], decode_1=[4.0], decode_32=[25.0])
    r = pb.ratios([ours_a, ours_b, peer_x, peer_y])
    assert set(r) == {"prefill", "decode_1", "decode_32"}  # decode_64: no numbers, no ratio
    assert (r["prefill"]["ours_row"], r["prefill"]["peer_row"], r["prefill"]["ratio"]) == ("b", "y", 80.0 / 50.0)
    assert not r["prefill"]["met"] and r["prefill"]["target"] == 2.0
    assert (r["decode_1"]["ratio"], r["decode_1"]["target"], r["decode_1"]["met"]) == (30.0 / 24.0, 1.25, True)
    assert r["decode_32"]["ratio"] == 60.0 / 38.0 and r["decode_32"]["target"] == 2.0
