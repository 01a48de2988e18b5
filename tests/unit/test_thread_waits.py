"""Numba's OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT, OMP_WAIT_POLICY=passive), unless the
user chose otherwise: the settings must be in the C environment before Numba loads its threading layer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ternpool.kernels.config import SPIN_COUNT, quiet_thread_waits

pytestmark = pytest.mark.unit

_SCRIPT = """
import ctypes, os
import numpy as np
from ternpool.kernels import set_threads, ternary_matmul, pack_ternary
set_threads(None)  # Numba loads its threading layer here
packed = pack_ternary(np.ones((8, 64), np.int8))
ternary_matmul(packed, np.ones((2, 64), np.int8))  # a parallel kernel ran
import numba
seen = ctypes.CDLL(None).getenv
seen.restype = ctypes.c_char_p
c = lambda name: (seen(name.encode()) or b"-").decode()
print(numba.threading_layer(), os.environ.get("OMP_WAIT_POLICY", "-"), c("OMP_WAIT_POLICY"),
      os.environ.get("GOMP_SPINCOUNT", "-"), c("GOMP_SPINCOUNT"))
"""


def _run(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_changes)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_threads_spin_briefly_then_sleep_by_default():
    layer, *seen = _run()
    assert seen == ["passive", "passive", SPIN_COUNT, SPIN_COUNT], layer


def test_the_users_own_wait_settings_win():
    assert _run(OMP_WAIT_POLICY="active")[1:] == ["active", "active", "-", "-"]
    assert _run(GOMP_SPINCOUNT="100")[1:] == ["-", "-", "100", "100"]
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert quiet_thread_waits(environ) == ("ACTIVE", None) and environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    environ = {}
    assert quiet_thread_waits(environ) == ("passive", SPIN_COUNT)
    assert environ == {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": SPIN_COUNT}
