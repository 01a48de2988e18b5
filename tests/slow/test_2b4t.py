"""Full-size 2b4t checks (not in CI: `python -m pytest -m slow tests/slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_MEASURE = """
import json, time, resource
t0 = time.perf_counter()
from ternpool.engine import Engine, Request, SamplingParams
e = Engine.load({path!r}, threads=2, slots=1, head={head!r}, weights_format={fmt!r})
load = time.perf_counter() - t0
r = e.generate([Request(0, prompt_token_ids=[128000] + list(range(1000, 1100)), params=SamplingParams(max_tokens=16))])[0]
rss = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
print(json.dumps({{"load_s": load, "peak_rss": rss, "tokens": r.completion_tokens}}))
"""


@pytest.fixture(scope="module")
def model_2b4t(tmp_path_factory):
    pytest.importorskip("llama_models")
    from ternpool.engine.modelgen import make_model

    return make_model(tmp_path_factory.mktemp("2b4t"), "2b4t")


@pytest.mark.parametrize("fmt,head", [("2bit", "bf16"), ("2bit", "int8"), ("1.6bit", "int8")])
def test_2b4t_converted_once_then_mapped_within_2gb(model_2b4t, fmt, head):
    from ternpool.engine.native import ensure_native

    ensure_native(model_2b4t, fmt)  # the one-time conversion into the cache, outside the measurement
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(path=str(model_2b4t), head=head, fmt=fmt)],
                         check=True, capture_output=True, text=True).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["tokens"] == 16
    assert m["peak_rss"] <= 2.0e9, m
