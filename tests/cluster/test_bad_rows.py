"""A row that raises inside the engine (here: the model's chat template refuses its role) is that
row's error in the output; the worker is not lost."""

from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.cluster.driver import PoolConfig, submit
from ternpool.engine import EngineConfig, SamplingParams
from ternpool.jobs import read_output

from helpers import RAISING_TEMPLATE, edit_json

pytestmark = pytest.mark.cluster

def test_a_row_whose_chat_template_raises_fails_alone_and_the_worker_survives(tmp_path, model_copy):
    model = model_copy
    edit_json(model / "tokenizer_config.json", chat_template=RAISING_TEMPLATE)
    roles = ["user", "user", "tool", "user", "system", "user"]
    src = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": [[{"role": r, "content": f"hello {i}"}] for i, r in enumerate(roles)]}), src)
    handle = submit(str(src), str(model), str(tmp_path / "out"), sampling=SamplingParams(max_tokens=3), shard_rows=3,
                    pool=PoolConfig(workers=1, engine=EngineConfig(threads=1, slots=2)))
    summary = handle.wait(timeout=600)
    assert summary.state == "finished" and summary.rows == 6 and summary.failed_rows == 1
    assert summary.worker_restarts == 0 and summary.retries == 0
    table = read_output(str(tmp_path / "out"))
    assert table.column("error").to_pylist() == [None, None, "TemplateError: unknown role: tool", None, None, None]
    assert table.column("finish_reason").to_pylist()[2] == "error"
    assert table.column("completion_tokens").to_pylist() == [3, 3, 0, 3, 3, 3]
