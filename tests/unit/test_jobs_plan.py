"""Shard plans: deterministic, following chunks, never crossing files, covering every row
exactly once; and splitting a shard to isolate a bad row."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.jobs import InputFile, InputSet, Shard, open_inputs, plan_shards, read_shard, \
    split_shard

pytestmark = pytest.mark.unit


def input_set(*files_chunks: tuple[int, ...]) -> InputSet:
    """An InputSet from chunk sizes alone (plan_shards reads nothing else)."""
    files = tuple(InputFile(f"f{i}.parquet", 100, None, sum(chunks), tuple(chunks), "parquet")
                  for i, chunks in enumerate(files_chunks))
    return InputSet("mem", files, "prompt", (), (), pa.schema([("prompt", pa.string())]))


def ranges(shards):
    return [(s.file_index, s.row_start, s.row_stop) for s in shards]


def check_cover(inputs: InputSet, shards: list[Shard], shard_rows: int) -> None:
    """Every row exactly once, row_index contiguous 0..N-1, ids 0..n-1 in row_index order."""
    assert [s.shard_id for s in shards] == list(range(len(shards)))
    covered = []
    offsets = [0]
    for f in inputs.files:
        offsets.append(offsets[-1] + f.num_rows)
    for s in shards:
        assert 1 <= s.num_rows <= shard_rows
        assert 0 <= s.row_start < s.row_stop <= inputs.files[s.file_index].num_rows
        assert s.first_row_index == offsets[s.file_index] + s.row_start
        covered.extend(range(s.first_row_index, s.first_row_index + s.num_rows))
    assert covered == list(range(inputs.num_rows))


def test_small_chunks_are_merged_up_to_shard_rows():
    inputs = input_set((3, 3, 3, 3, 3))
    shards = plan_shards(inputs, 7)
    assert ranges(shards) == [(0, 0, 6), (0, 6, 12), (0, 12, 15)]
    check_cover(inputs, shards, 7)


def test_large_chunk_is_cut():
    inputs = input_set((10, 2, 25))
    shards = plan_shards(inputs, 8)
    assert ranges(shards) == [(0, 0, 8), (0, 8, 10), (0, 10, 12), (0, 12, 20), (0, 20, 28),
                              (0, 28, 36), (0, 36, 37)]
    check_cover(inputs, shards, 8)


def test_shards_never_cross_files_and_skip_empty_ones():
    inputs = input_set((4, 4), (), (0,), (3,), (5, 0, 5))
    shards = plan_shards(inputs, 10)
    assert ranges(shards) == [(0, 0, 8), (3, 0, 3), (4, 0, 10)]
    check_cover(inputs, shards, 10)
    assert shards[1].first_row_index == 8 and shards[2].first_row_index == 11


@pytest.mark.parametrize("shard_rows", [1, 2, 3, 5, 64, 1000])
def test_random_layouts_cover_every_row(shard_rows):
    import random

    rng = random.Random(shard_rows)
    for _ in range(20):
        files = [tuple(rng.choice([0, 1, 2, 7, 13, 40]) for _ in range(rng.randint(0, 5)))
                 for _ in range(rng.randint(1, 4))]
        inputs = input_set(*files)
        shards = plan_shards(inputs, shard_rows)
        check_cover(inputs, shards, shard_rows)
        assert plan_shards(inputs, shard_rows) == shards  # deterministic


def test_plan_from_real_files_and_read_shard(tmp_path):
    for name, start, n, group in (("b.parquet", 10, 7, 3), ("a.parquet", 0, 10, 4)):
        table = pa.table({"id": list(range(start, start + n)),
                          "prompt": [f"p{i}" for i in range(start, start + n)]})
        pq.write_table(table, tmp_path / name, row_group_size=group)
    inputs = open_inputs(str(tmp_path))
    shards = plan_shards(inputs, 5)
    check_cover(inputs, shards, 5)
    assert plan_shards(open_inputs(str(tmp_path)), 5) == shards
    seen = []
    for shard in shards:
        table = read_shard(inputs, shard)
        assert table.column_names == ["row_index", "id", "prompt"]
        assert table.schema.field("row_index").type == pa.int64()
        seen.extend(zip(table["row_index"].to_pylist(), table["id"].to_pylist()))
    # files sorted by path: a.parquet (ids 0..9) then b.parquet (ids 10..16)
    assert seen == [(i, i) for i in range(17)]


def test_rejects_bad_shard_rows():
    with pytest.raises(ValueError, match="shard_rows"):
        plan_shards(input_set((3,)), 0)


def test_split_shard():
    shard = Shard(4, 1, 10, 17, 110)
    halves = split_shard(shard)
    assert [(s.row_start, s.row_stop, s.first_row_index) for s in halves] == \
        [(10, 14, 110), (14, 17, 114)]
    assert all(s.shard_id == 4 and s.file_index == 1 for s in halves)
    thirds = split_shard(shard, 3)
    assert [s.num_rows for s in thirds] == [3, 2, 2]
    assert [r for s in thirds for r in range(s.first_row_index, s.first_row_index + s.num_rows)] \
        == list(range(110, 117))
    assert split_shard(Shard(0, 0, 5, 6, 5)) == [Shard(0, 0, 5, 6, 5)]
    assert len(split_shard(shard, 50)) == 7
    with pytest.raises(ValueError, match="parts"):
        split_shard(shard, 0)


def test_split_down_to_single_rows():
    pending = [Shard(0, 0, 0, 13, 0)]
    singles = []
    while pending:
        shard = pending.pop()
        if shard.num_rows == 1:
            singles.append(shard.first_row_index)
        else:
            pending.extend(split_shard(shard))
    assert sorted(singles) == list(range(13))
