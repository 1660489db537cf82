"""Test-wide settings: one CPU thread per test process and a per-session dataset cache.

Tiny models run faster on one thread than on several, and one thread keeps timings sane
when other processes share the cores. The glyphs demo dataset is cached once per session
in a temporary directory (``TNAS_CACHE_DIR``) so tests never touch ``~/.cache/tnas``.
"""
import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TNAS_PROGRESS", "0")


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """Point TNAS_CACHE_DIR at a per-session temporary directory (unless the caller set one)."""
    if os.environ.get("TNAS_TEST_KEEP_CACHE_DIR"):
        yield os.environ.get("TNAS_CACHE_DIR")
        return
    previous = os.environ.get("TNAS_CACHE_DIR")
    path = str(tmp_path_factory.mktemp("tnas_cache"))
    os.environ["TNAS_CACHE_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("TNAS_CACHE_DIR", None)
    else:
        os.environ["TNAS_CACHE_DIR"] = previous


def gpu_available() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Tiny search and train checkpoints made once per session (see test_evaluate.tiny_runs)."""
    from test_evaluate import tiny_runs

    return tiny_runs(tmp_path_factory.getbasetemp())
