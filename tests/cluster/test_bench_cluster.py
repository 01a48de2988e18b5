"""`ternpool bench cluster` on real simulated clusters of 1 and 2 one-CPU nodes (tiny model)."""

from __future__ import annotations

import json

import pytest

from ternpool.cluster.cli import main

pytestmark = pytest.mark.cluster


def test_bench_cluster_runs_the_same_job_on_each_cluster_size(tiny_model, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "cluster", "--model", tiny_model, "--nodes", "1,2", "--streams", "4", "--rows", "32",
                 "--max-tokens", "4", "--shard-rows", "4", "--coordinator-shards", "50", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "one coordinator keeps about" in text
    r = json.loads(out.read_text())
    one, two = r["runs"]
    # a tiny job can be over before the second node's worker has loaded the model
    assert (one["nodes"], one["workers"], two["nodes"]) == (1, 1, 2) and two["workers"] in (1, 2)
    for run in r["runs"]:
        assert run["rows"] == 32 and run["shards"] == 8 and run["pieces_leased"] >= 8
        assert run["generated_tokens"] > 0 and run["tokens_per_s"] > 0
        assert run["worker_s"] > 0 and 0 <= run["worker_wait_fraction"] < 1
        assert run["coordinator_ms_per_shard"] > 0 and run["shard_mean_s"] > 0
    assert one["generated_tokens"] == two["generated_tokens"]  # greedy: the same job, the same tokens
    assert one["speedup"] == 1.0 and two["speedup"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert r["coordinator_capacity"]["shards"] == 50


def test_bench_prefix_measures_each_job_with_the_cache_on_and_off(tiny_model, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["bench", "prefix", "--model", tiny_model, "--threads", "1", "--rows", "16", "--instruction-words",
                 "40", "--tail-words", "4", "--max-tokens", "2", "--shard-rows", "4", "--parts", "shared",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix cache on / off:" in text
    r = json.loads(out.read_text())
    on, off = r["shared"]["on"], r["shared"]["off"]
    assert on["prompt_tokens"] == off["prompt_tokens"] and on["generated_tokens"] == off["generated_tokens"]
    assert off["cached_tokens"] == 0 and 0.5 < on["hit_rate"] < 1  # the instruction is most of each prompt
    assert r["shared"]["ratio"] == pytest.approx(on["tokens_per_s"] / off["tokens_per_s"])
    assert "distinct" not in r and "routing" not in r  # only the parts asked for (routing: the real run's)
    assert main(["bench", "prefix", "--model", tiny_model, "--parts", "shared,everything"]) != 0
    assert "--parts takes shared, distinct and routing" in capsys.readouterr().err
