"""Tests never reach the network: ``backbone.weights=auto`` falls back to random weights at once."""

import os

import pytest

os.environ["RCNN_OFFLINE"] = "1"  # inherited by the subprocesses tests start, too


@pytest.fixture(autouse=True)
def _no_remembered_download_failure(monkeypatch):
    import features.backbone as BB

    monkeypatch.setattr(BB, "_download_failed", [])


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as torchrun gives each rank (OMP_NUM_THREADS=1): a one-process
    run in the test's own process sums in the ranks' order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: a core a test process (the test processes share them)
    import torch

    import rcnn.config

    torch.set_num_threads(1)
    # workers=0 ("one per core") counts this process's one core, so per-image work stays in the test's process;
    # the tests of worker processes ask for them by number (workers=2)
    rcnn.config.cores = lambda: 1
