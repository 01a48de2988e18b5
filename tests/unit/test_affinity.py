"""Prefix-aware leasing (cluster/affinity.py) in a coordinator without Ray: each instruction's shards
go to one worker, a new instruction to a worker without it, and nothing is lost or written twice."""

from __future__ import annotations

import pytest

from ternpool.cluster.affinity import SIGNATURE_CHARS, row_signature, shard_signature
from ternpool.cluster.coordinator import DONE, WAIT, Coordinator
from ternpool.engine.requests import Result
from ternpool.jobs import Manifest, read_output

from helpers import make_job, write_prompts

pytestmark = pytest.mark.unit

INSTRUCTIONS = [f"instruction {k}: " + "x" * SIGNATURE_CHARS for k in "ABCD"]
SHARD_ROWS, SHARDS = 4, 24


def _coordinator(tmp_path, affinity: bool) -> Coordinator:
    """Shards of 4 rows each, shard i all rows of instruction i % 4 (the instructions' rows interleaved
    shard by shard), each row with its own tail."""
    src = tmp_path / "p.parquet"
    write_prompts(src, [INSTRUCTIONS[(r // SHARD_ROWS) % 4] + f" row {r}" for r in range(SHARD_ROWS * SHARDS)],
                  row_group_size=SHARD_ROWS)
    spec, inputs, plan = make_job(tmp_path, src=src, shard_rows=SHARD_ROWS)
    return Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, {"m": 1}), 2,
                       prefix_affinity=affinity)


def _run(coord: Coordinator, turns: list[str], lose: str | None = None) -> dict[str, set[int]]:
    """Workers lease one piece each in the order of `turns` (repeated) and complete it; `lose` is lost
    once 6 pieces were leased. Returns the instructions (shard_id % 4) each worker was given."""
    given: dict[str, set[int]] = {w: set() for w in turns}
    leases = 0
    active = set(turns)
    while active:
        for w in [t for t in turns if t in active]:
            if w not in active:
                continue
            lease = coord.lease(w)
            if lease == DONE:
                active.remove(w)
                continue
            if lease == WAIT:
                continue
            key, table = lease
            given[w].add(key[0] % 4)
            leases += 1
            if w == lose and leases > 6:
                coord.worker_lost(w, "test")
                active.remove(w)
                continue
            rows = table.column("row_index").to_pylist()
            assert coord.complete(w, key, [Result(i, "t", (1,), 1, 1, "length") for i in rows])
    return given


def test_each_instruction_goes_to_one_worker(tmp_path):
    coord = _coordinator(tmp_path, affinity=True)
    given = _run(coord, ["w1", "w2"])
    assert given["w1"] | given["w2"] == {0, 1, 2, 3}
    assert not given["w1"] & given["w2"], given  # no instruction computed by both workers
    assert len(given["w1"]) == len(given["w2"]) == 2  # new instructions go to a worker without any
    assert read_output(coord.manifest.output).column("row_index").to_pylist() == list(range(SHARD_ROWS * SHARDS))


@pytest.mark.parametrize("turns", [["w1", "w2", "w2"], ["w1", "w1", "w1", "w2"]])
def test_a_faster_worker_takes_another_instruction_rather_than_wait(tmp_path, turns):
    """Uneven paces: the faster worker runs out of its own instructions' shards and takes on one more
    (idling would cost more than computing it), still far from every worker computing every one."""
    given = _run(_coordinator(tmp_path, affinity=True), turns)
    assert given["w1"] | given["w2"] == {0, 1, 2, 3}
    assert len(given["w1"]) + len(given["w2"]) <= 5, given


def test_without_affinity_both_workers_compute_every_instruction(tmp_path):
    """A run in queue order: what the affinity saves (and proof the tests above can fail)."""
    given = _run(_coordinator(tmp_path, affinity=False), ["w1", "w2", "w2"])
    assert given["w1"] == given["w2"] == {0, 1, 2, 3}


def test_a_lost_workers_instructions_move_on_and_every_row_is_written_once(tmp_path):
    coord = _coordinator(tmp_path, affinity=True)
    given = _run(coord, ["w1", "w2", "w3"], lose="w1")
    assert given["w2"] | given["w3"] == {0, 1, 2, 3}  # the survivors took over the lost one's instructions
    assert coord.retries == 1
    table = read_output(coord.manifest.output)
    assert table.column("row_index").to_pylist() == list(range(SHARD_ROWS * SHARDS))


def test_signatures():
    chat = [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "u"}]
    assert row_signature("ab") == "ab" and len(row_signature("a" * 1000)) == SIGNATURE_CHARS
    assert row_signature(chat) == row_signature([chat[0], {"role": "user", "content": "other"}])
    assert row_signature(None) is None
    assert shard_signature(["b", "a", "b", None]) == "b" and shard_signature([None]) is None
