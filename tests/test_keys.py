"""Cache keys name inputs by what they are (issue #27): the same on every machine that holds a copy, and the
same before and after torchvision's ImageNet file is downloaded."""

import json
import os
import shutil

import torch
from torchvision.models import googlenet

from features import backbone as BB
from rcnn.run import main

from .test_detect import TINY


def _keys(run) -> dict:
    keys = {s: json.loads((run / s / "metrics.json").read_text())["key"] for s in ("proposals", "features")}
    proposals = json.loads((run / "proposals" / keys["proposals"] / "manifest.json").read_text())
    return {**keys, "data": proposals["inputs"]["data"]}


def test_a_copied_tree_with_other_dates_gives_the_same_keys(tmp_path, monkeypatch):
    """Two machines with their own copies of the dataset and the weights (a torchrun or Ray cluster, a GPU
    box) compute the same keys, so their shards share one cache."""
    monkeypatch.setenv("RCNN_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a"
    a.mkdir()
    torch.save(BB.random_init(googlenet(weights=None, aux_logits=False, init_weights=False)).state_dict(), a / "w.pt")
    args = [a for a in TINY if not a.startswith("backbone.weights")] + ["proposals.method=ss", "stage=features"]
    assert main([*args, f"dataset.root={a / 'demo'}", f"backbone.weights={a / 'w.pt'}", f"out={tmp_path / 'run_a'}"]) == 0

    b = tmp_path / "b"
    shutil.copytree(a, b)  # (copytree keeps dates: give every file others, as a fresh copy would have)
    for path in b.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert main([*args, f"dataset.root={b / 'demo'}", f"backbone.weights={b / 'w.pt'}", f"out={tmp_path / 'run_b'}"]) == 0
    assert _keys(tmp_path / "run_a") == _keys(tmp_path / "run_b")

    # What the key must see still changes it: other weights (same size, same date) give other features.
    state = torch.load(b / "w.pt", weights_only=True)
    state["conv1.conv.weight"] = state["conv1.conv.weight"] * 0.5
    stat = (b / "w.pt").stat()
    torch.save(state, b / "new.pt")  # a replaced file (as a download or a copy writes it), dated as the old one
    os.utime(b / "new.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(b / "new.pt", b / "w.pt")
    assert main([*args, f"dataset.root={b / 'demo'}", f"backbone.weights={b / 'w.pt'}", f"out={tmp_path / 'run_b'}"]) == 0
    changed = _keys(tmp_path / "run_b")
    assert changed["data"] == _keys(tmp_path / "run_a")["data"] and changed["features"] != _keys(tmp_path / "run_a")["features"]


def test_imagenet_weights_downloaded_during_the_first_run_keep_its_keys(tmp_path, monkeypatch):
    """backbone.weights=imagenet on a machine that has not downloaded the file yet: it is fetched when the
    weights are resolved, and the fine-tuned network (keyed by what it started from) is the one the features
    and the detector use."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("RCNN_OFFLINE")
    hub = BB.imagenet_weights_path()
    standin = BB.random_init(googlenet(weights=None, aux_logits=True, init_weights=False)).state_dict()
    downloads = []

    def download(self, progress=True, check_hash=False):  # what torchvision does: the file appears in the hub
        downloads.append(1)
        hub.parent.mkdir(parents=True, exist_ok=True)
        torch.save(standin, hub)
        return torch.load(hub, weights_only=True)

    monkeypatch.setattr(BB.GoogLeNet_Weights.IMAGENET1K_V1.__class__, "get_state_dict", download)
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("backbone.weights")] + [
        "backbone.weights=imagenet", "proposals.method=ss", "finetune.enabled=true", "finetune.iterations=2",
        "finetune.batch_size=8", "finetune.fg_per_batch=2", f"dataset.root={tmp_path / 'demo'}", f"out={run}", "stage=svm",
        "svm.C=0.001",  # (no choice of C)
    ]  # fmt: skip
    assert not hub.exists()
    assert main(args) == 0
    assert hub.exists() and len(downloads) == 1
    features = json.loads((run / "features" / "metrics.json").read_text())
    assert features["backbone_weights"] == "file"  # the fine-tuned network, not the downloaded one
    tuned = json.loads((run / "finetune" / "metrics.json").read_text())
    assert (run / "finetune" / tuned["key"] / "model.pt").exists()
    # A second run finds every stage in the cache: nothing is keyed differently now that the file is there.
    before = {s: (run / s / "metrics.json").read_text() for s in ("finetune", "features", "svm")}
    assert main(args) == 0
    for s, text in before.items():
        assert json.loads((run / s / "metrics.json").read_text())["key"] == json.loads(text)["key"]
