"""Tests never reach the network: ``backbone.weights=auto`` falls back to random weights at once."""

import os

import pytest

os.environ["RCNN_OFFLINE"] = "1"  # inherited by the subprocesses tests start, too


@pytest.fixture(autouse=True)
def _no_remembered_download_failure(monkeypatch):
    import features.backbone as BB

    monkeypatch.setattr(BB, "_download_failed", [])
