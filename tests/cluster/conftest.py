"""Fixtures for tests that run Ray: prompt files and a multi-node cluster on this machine."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.jobs.demo import WORDS  # the words of `ternpool demo`'s prompts


def make_prompts(path, rows: int, seed: int = 0, extra: dict | None = None, row_group_size: int = 50):
    """A prompts Parquet with mixed lengths, per-row sampling columns, passthrough columns and bad rows."""
    import random

    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 5, 12, 40]))) for _ in range(rows)]
    max_tokens = [rng.choice([None, 4, 8, 12]) for _ in range(rows)]
    temperature = [None if i % 4 else 0.7 for i in range(rows)]
    seeds = [None if i % 3 else 1000 + i for i in range(rows)]
    bad = {}
    if rows > 20:
        prompts[5] = None
        bad[5] = "null"
        prompts[11] = ""
        bad[11] = "empty"
        temperature[17] = -2.0
        bad[17] = "temperature"
    cols = {
        "id": pa.array([f"r{i}" for i in range(rows)]),
        "prompt": pa.array(prompts, pa.string()),
        "max_tokens": pa.array(max_tokens, pa.int64()),
        "temperature": pa.array(temperature, pa.float64()),
        "seed": pa.array(seeds, pa.int64()),
        "meta": pa.array([{"n": i, "tag": "t" + str(i % 3)} for i in range(rows)]),
    }
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return bad


@pytest.fixture(name="make_prompts")
def make_prompts_fixture():
    return make_prompts


@pytest.fixture
def ray_cluster():
    """A head with no CPUs (coordinator only) and three one-CPU worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * 1024 ** 2})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=150 * 1024 ** 2) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(autouse=True)
def no_leaked_ray_connection():
    """A test must not leave this process connected to Ray: fail that test, not the next ones."""
    import ray

    assert not ray.is_initialized(), "an earlier test left Ray initialized"
    yield
    leaked = ray.is_initialized()
    if leaked:
        ray.shutdown()
    assert not leaked, "this test left Ray initialized"
