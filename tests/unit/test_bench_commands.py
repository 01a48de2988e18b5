"""The benchmark commands run and print what they promise (they are commands, not timed tests)."""

from __future__ import annotations

import json

import pytest

from ternpool.cluster.cli import main
from ternpool.kernels import config

pytestmark = pytest.mark.unit


def _assert_kernel_path(text: str, data: dict) -> None:
    """Both benches print and write which instruction set ran and the CPU features that decide it."""
    path = data["kernel_path"]
    assert path["isa"] == data["isa"] == config.ISA and path["isa"] in path["usable"]
    assert {"avx2", "avx512vnni", "avxvnni", "amx-int8"} <= set(path["features"])
    assert f"kernel path {config.ISA} (" in text and f"CPU {path['cpu']} has " in text
    for name, on in path["features"].items():
        assert (name in text.split("; lacks ")[0].split(" has ")[-1].split()) == on, (name, text)


def test_bench_kernels_prints_every_shape_and_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--shape", "tiny", "--batches", "1,3", "--threads", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory read bandwidth" in text and "vs numpy" in text
    data = json.loads(out.read_text())
    _assert_kernel_path(text, data)
    assert data["bandwidth"]["threads"] == 1 and data["bandwidth_one_thread"]["threads"] == 1
    assert data["bandwidth"]["buffer_bytes"] >= 2 ** 30 and data["read_bandwidth_one_thread"] > 0
    names = {(r["name"], r["format"]) for r in data["rows"]}
    linears = {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert names == {(n, f) for n in linears for f in ("2bit", "1.6bit")} | {("head", "bf16"), ("head", "int8")}
    assert {r["batch"] for r in data["rows"]} == {1, 3}
    assert all(r["seconds"] > 0 and r["gmacs"] > 0 for r in data["rows"]) and data["read_bandwidth"] > 0


def test_bench_model_reports_prefill_decode_and_concurrency(tiny_model, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "model", "--model", tiny_model, "--prompt-len", "16", "--gen", "6",
                 "--concurrency", "1,3", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "single-stream decode" in text and "ceiling" in text and "concurrency   3" in text
    data = json.loads(out.read_text())
    _assert_kernel_path(text, data)
    assert data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert data["read_bandwidth"] == data["bandwidth"]["bytes_per_s"] > 0 and data["bandwidth"]["threads"] == 1
    assert data["ceiling_tokens_per_s"] == pytest.approx(data["read_bandwidth"] / data["bytes_per_token"])
    assert (data["fraction_of_ceiling"] is None) != (data["bandwidth_low_by"] is None)
    # the bandwidth buffer (>= 1 GiB, freed before the model loads) is not the tiny model's peak RSS
    assert not data["peak_rss_includes_bandwidth_buffer"] and data["peak_rss_bytes"] < data["bandwidth"]["buffer_bytes"]
    assert set(data["concurrency"]) == {"1", "3"} and data["bytes_per_token"] > 0


def test_bench_head_reports_agreement_and_where_greedy_tokens_first_differ(tiny_model, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["bench", "head", "--model", tiny_model, "--prompts", "3", "--prompt-len", "12", "--gen", "8",
                 "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["positions"] == 36 and 0 <= data["misses"] <= 36
    first = data["greedy_first_difference"]
    assert data["greedy_tokens"] == 8 and len(first) == 3 and all(f is None or 0 <= f < 8 for f in first)
    assert f"greedy, 3 prompts x 8 tokens: {sum(f is None for f in first)} identical" in text


def test_first_difference_of_two_token_sequences():
    from ternpool.engine.bench import _first_difference

    assert _first_difference((1, 2, 3), (1, 2, 3)) is None
    assert _first_difference((1, 2, 3), (1, 5, 3)) == 1
    assert _first_difference((7,), (8,)) == 0
    assert _first_difference((1, 2), (1, 2, 3)) == 2  # one stopped (end of sequence) where the other went on
