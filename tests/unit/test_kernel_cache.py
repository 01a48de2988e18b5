"""Compiled kernels are cached in the user's ternpool cache, never inside the installed package.

A non-editable install that cached kernels in site-packages/ternpool/kernels/__pycache__ left that
folder behind after `pip uninstall`, and it shadowed a later editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KERNELS_SRC = ROOT / "kernels"

# Compiles one cached kernel and prints where ternpool.kernels was imported from and its cache dir.
_COMPILE = """
import numpy as np
import ternpool.kernels
from ternpool.kernels import config, quantize_rows
quantize_rows(np.ones((2, 5), np.float32))
print(ternpool.kernels.__file__)
print(getattr(config, "KERNEL_CACHE_DIR", "not configured"))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "TERNPOOL_ISA")}
    env.update(extra)
    return env


def _run(code: str, env: dict) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()


def _numba_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc"))


def test_every_cached_kernel_is_located_in_the_cache_dir():
    """Each @njit(cache=True) function of ternpool.kernels writes to KERNEL_CACHE_DIR, none to the package."""
    import importlib
    import pkgutil

    import ternpool.kernels
    from numba.core.registry import CPUDispatcher
    from ternpool.kernels import config

    cached = []
    for info in pkgutil.iter_modules(ternpool.kernels.__path__):
        module = importlib.import_module(f"ternpool.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher) and obj._cache is not None and obj.py_func.__module__ == module.__name__:
                cached.append((f"{info.name}.{name}", Path(obj._cache._cache_path)))
    assert len(cached) >= 10, cached  # ternary, base3, head8, quantize, attention, bf16 ...
    package = Path(ternpool.kernels.__file__).resolve().parent
    for name, path in cached:
        assert config.KERNEL_CACHE_DIR in path.parents, (name, path)
        assert package not in path.resolve().parents, (name, path)


def test_installed_package_gets_no_compiled_files(tmp_path):
    """The real bug: a package installed as files in a site directory (what `pip install .` does) runs a
    kernel; the index and code land under TERNPOOL_CACHE_DIR/numba, nothing in the installed tree."""
    site = tmp_path / "site"
    shutil.copytree(KERNELS_SRC, site / "ternpool" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "cache"
    out = _run(_COMPILE, _env(PYTHONPATH=str(site), TERNPOOL_CACHE_DIR=str(cache)))
    assert Path(out[0]).parent == site / "ternpool" / "kernels", out  # the copy ran, not the source tree
    assert _numba_files(site) == []
    kernel_dir = Path(out[1])
    assert kernel_dir.parent == cache / "numba", out
    written = _numba_files(kernel_dir)
    assert any(p.name.startswith("quantize._quantize_rows") and p.suffix == ".nbi" for p in written), written
    assert any(p.suffix == ".nbc" for p in written), written


def test_cache_key_names_version_isa_cpu_and_sources(tmp_path):
    """A different ISA, or changed kernel source, picks another folder, so stale code is never loaded."""
    from llvmlite import binding

    site = tmp_path / "site"
    shutil.copytree(KERNELS_SRC, site / "ternpool" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    show = "from ternpool.kernels import config; print(config.kernel_cache_key())"
    env = _env(PYTHONPATH=str(site), TERNPOOL_CACHE_DIR=str(tmp_path / "cache"))
    (generic,) = _run(show, dict(env, TERNPOOL_ISA="generic"))
    (avx2,) = _run(show, dict(env, TERNPOOL_ISA="avx2"))
    assert generic != avx2
    assert "-generic-" in generic and "-avx2-" in avx2
    assert binding.get_host_cpu_name() in generic
    simd = site / "ternpool" / "kernels" / "simd.py"  # a file of intrinsics, no cached function of its own
    simd.write_text(simd.read_text() + "\n# changed\n")
    (changed,) = _run(show, dict(env, TERNPOOL_ISA="generic"))
    assert changed != generic and changed.rsplit("-", 1)[0] == generic.rsplit("-", 1)[0]


def test_users_numba_cache_dir_is_respected(tmp_path):
    mine = tmp_path / "my-numba-cache"
    out = _run(_COMPILE, _env(NUMBA_CACHE_DIR=str(mine), TERNPOOL_CACHE_DIR=str(tmp_path / "cache")))
    assert Path(out[1]) == mine
    assert any(p.suffix == ".nbi" for p in _numba_files(mine))
    assert not (tmp_path / "cache" / "numba").exists()


def test_native_weight_cache_shares_the_root(tmp_path, monkeypatch):
    from ternpool.engine.native import default_cache_dir
    from ternpool.kernels.config import cache_root

    monkeypatch.setenv("TERNPOOL_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    assert default_cache_dir() == tmp_path / "native"
    monkeypatch.delenv("TERNPOOL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "ternpool" / "native"


def test_unwritable_cache_compiles_in_memory_and_writes_nothing_to_the_package(tmp_path):
    """Numba would fall back to the package's __pycache__ when the cache dir cannot be made: caching is off."""
    site = tmp_path / "site"
    shutil.copytree(KERNELS_SRC, site / "ternpool" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    out = _run(_COMPILE, _env(PYTHONPATH=str(site), TERNPOOL_CACHE_DIR=str(blocked)))
    assert out[-1] == "None", out
    assert _numba_files(site) == [] and _numba_files(tmp_path) == []


def test_pip_installed_package_leaves_nothing_behind_after_uninstall(tmp_path):
    """The bug as it happened: a non-editable `pip install` of this source runs a kernel; pip's uninstall then
    removes the files of the wheel's RECORD (and their .pyc): anything else under the package (compiled
    kernels in kernels/__pycache__) outlived it and shadowed the next, editable, install."""
    src = tmp_path / "src"  # a copy: building in the work tree would leave build/ there
    for name in ("kernels", "engine", "jobs", "cluster"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = _run(_COMPILE, _env(PYTHONPATH=str(site), TERNPOOL_CACHE_DIR=str(tmp_path / "cache")))
    assert Path(out[0]).parent == site / "ternpool" / "kernels", out
    (record,) = site.glob("ternpool-*.dist-info/RECORD")
    installed = {(site / line.split(",")[0]).resolve() for line in record.read_text().splitlines() if line}
    left = [p for p in (site / "ternpool").rglob("*") if p.is_file() and p.resolve() not in installed
            and p.suffix != ".pyc"]
    assert left == [], f"pip uninstall would leave these behind: {left}"
