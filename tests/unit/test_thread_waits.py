"""Numba's OpenMP threads wait passively (OMP_WAIT_POLICY=passive) unless the user chose otherwise:
the setting must be in the C environment before Numba loads its threading layer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ternpool.kernels.config import quiet_thread_waits

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
print(numba.threading_layer(), os.environ.get("OMP_WAIT_POLICY"), seen(b"OMP_WAIT_POLICY").decode())
"""


def _run(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_changes)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_threads_wait_passively_by_default():
    layer, python_env, c_env = _run()
    assert (python_env, c_env) == ("passive", "passive"), layer


def test_the_users_own_wait_policy_wins():
    assert _run(OMP_WAIT_POLICY="active")[1:] == ["active", "active"]
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert quiet_thread_waits(environ) == "ACTIVE" and environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    environ = {}
    assert quiet_thread_waits(environ) == "passive" and environ == {"OMP_WAIT_POLICY": "passive"}
