"""An example prompts file for `ternpool demo`: mixed lengths, chat-free text prompts, per-row
sampling columns on some rows, a passthrough column, and a few rows that are bad on purpose."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("river mill harvest bread market children weather story king garden letter morning window "
          "mountain village music winter lantern bridge ocean forest").split()


def write_demo_prompts(path: str | Path, rows: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    prompts, max_tokens, temperature, seeds, topics = [], [], [], [], []
    for i in range(rows):
        n = rng.choice([1, 3, 8, 20, 60])
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize())
        max_tokens.append(rng.choice([None, 8, 16, 32]))
        temperature.append(None if i % 3 else 0.8)
        seeds.append(None if i % 5 else i)
        topics.append(rng.choice(["fiction", "news", "letters"]))
    if rows >= 10:
        prompts[7] = None  # a bad row: null prompt
        temperature[9] = -1.0  # a bad row: impossible sampling value
    table = pa.table({
        "id": pa.array([f"demo-{i:04d}" for i in range(rows)]),
        "prompt": pa.array(prompts, pa.string()),
        "max_tokens": pa.array(max_tokens, pa.int64()),
        "temperature": pa.array(temperature, pa.float64()),
        "seed": pa.array(seeds, pa.int64()),
        "topic": pa.array(topics),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)
    return path
