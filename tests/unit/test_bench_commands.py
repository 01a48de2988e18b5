"""The benchmark commands run and print what they promise (they are commands, not timed tests)."""

from __future__ import annotations

import json

import pytest

from ternpool.cluster.cli import main

pytestmark = pytest.mark.unit


def test_bench_kernels_prints_every_shape_and_writes_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--shape", "tiny", "--batches", "1,3", "--threads", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory read bandwidth" in text and "vs numpy" in text
    data = json.loads(out.read_text())
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
    assert data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert set(data["concurrency"]) == {"1", "3"} and data["bytes_per_token"] > 0
