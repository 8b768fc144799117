"""Input normalisation travels with every set of weights: ImageNet's file, fine-tuned, MultiBox, detector."""

import json

import numpy as np
import pytest
import torch
from torchvision.models import googlenet

from features import backbone as BB
from features.backbone import (
    NORMALIZATION_IMAGENET,
    NORMALIZATION_INCEPTION,
    build_googlenet,
    resolve_weights,
)
from features.extract import RegionFeatures, features_warp
from proposals.multibox import cluster_priors, export_model, load_model, predict, train_multibox
from rcnn.detector import Detector
from rcnn.run import main

from .test_detect import TINY


@pytest.fixture
def imagenet_hub(tmp_path, monkeypatch):
    """A stand-in for torchvision's ImageNet GoogLeNet file: its key names (aux heads, 1000-way fc) and
    file name, random values, in a temporary hub folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = BB.imagenet_weights_path()
    assert str(path).startswith(str(tmp_path)) and path.name == "googlenet-1378be20.pth"
    path.parent.mkdir(parents=True)
    net = BB.random_init(googlenet(weights=None, aux_logits=True, init_weights=False))  # features of usable scale
    g = torch.Generator().manual_seed(1)
    state = {k: v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}  # not the random network's own weights  # fmt: skip
    assert "aux1.fc2.weight" in state and state["fc.weight"].shape == (1000, 1024)
    torch.save(state, path)
    return path


def features_of(net, seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 60, 70], [30, 10, 95, 50]], np.float32)
    return features_warp(RegionFeatures(BB.fold_batchnorm(net)), rgb, boxes, size=64, padding=4)


def test_imagenet_by_name_and_by_path_give_identical_features(imagenet_hub):
    by_name, w1 = build_googlenet("imagenet")
    by_path, w2 = build_googlenet(str(imagenet_hub))
    assert w1.kind == "imagenet" and w2.kind == "file"
    assert w1.normalization == w2.normalization == NORMALIZATION_INCEPTION
    assert by_name.transform_input and by_path.transform_input
    np.testing.assert_array_equal(features_of(by_name), features_of(by_path))
    # The same weights fed ImageNet-normalised input without the conversion give other features.
    plain = BB.set_normalization(build_googlenet(str(imagenet_hub))[0], NORMALIZATION_IMAGENET)
    assert not np.allclose(features_of(plain).astype(np.float32), features_of(by_name).astype(np.float32), atol=1e-2)
    # auto takes the cached file, as imagenet does.
    assert resolve_weights("auto").describe() == w1.describe()


def test_a_renamed_plain_state_dict_is_taken_as_imagenet_normalised(imagenet_hub, tmp_path):
    renamed = tmp_path / "my_weights.pth"
    renamed.write_bytes(imagenet_hub.read_bytes())
    assert resolve_weights(str(renamed)).normalization == NORMALIZATION_IMAGENET
    torch.save({"backbone": torch.load(imagenet_hub, weights_only=True), "normalization": "inception"}, renamed)
    assert resolve_weights(str(renamed)).normalization == NORMALIZATION_INCEPTION
    torch.save({"backbone": {}, "normalization": "bgr"}, renamed)
    with pytest.raises(BB.BackboneError, match="unknown input normalization 'bgr'"):
        resolve_weights(str(renamed))


def test_auto_offline_without_the_shipped_backbone_falls_back_to_random_loudly(tmp_path, monkeypatch, caplog):

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(BB, "SHIPPED_PATH", tmp_path / "no-shipped-backbone.pt")
    monkeypatch.setattr(BB, "_warned", set())
    with caplog.at_level("WARNING"):
        w = resolve_weights("auto")
    assert w.kind == "none" and w.normalization == NORMALIZATION_IMAGENET
    assert "USING RANDOM INITIALISATION" in caplog.text and "RCNN_OFFLINE is set" in caplog.text


def test_auto_downloads_when_online(tmp_path, monkeypatch, imagenet_hub):
    """A user with internet gets ImageNet weights from auto without asking (the download is simulated)."""
    cached = imagenet_hub.read_bytes()
    imagenet_hub.unlink()
    monkeypatch.delenv("RCNN_OFFLINE")

    def download(self, progress=True, check_hash=False):
        imagenet_hub.write_bytes(cached)
        return torch.load(imagenet_hub, weights_only=True)

    monkeypatch.setattr(BB.GoogLeNet_Weights.IMAGENET1K_V1.__class__, "get_state_dict", download)
    w = resolve_weights("auto")
    assert w.kind == "imagenet" and w.normalization == NORMALIZATION_INCEPTION and imagenet_hub.exists()


def test_finetune_features_detector_share_one_normalisation(imagenet_hub, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={run}", "backbone.weights=imagenet",
            "finetune.enabled=true", "finetune.iterations=2", "finetune.batch_size=8", "finetune.fg_per_batch=2",
            "proposals.method=ss"]  # fmt: skip
    args = [a for a in args if a != "backbone.weights=none"]
    assert main(args) == 0
    tuned = json.loads((run / "finetune" / "metrics.json").read_text())["model"]
    saved = torch.load(tuned, weights_only=True)
    assert saved["normalization"] == NORMALIZATION_INCEPTION
    features = json.loads((run / "features" / "metrics.json").read_text())
    manifest = json.loads((run / "features" / features["key"] / "manifest.json").read_text())
    # keyed by what the fine-tuned file holds (its bytes' hash), not where it lies
    from rcnn.filehash import content_hash

    assert manifest["config"]["backbone"]["stamp"] == "sha256:" + content_hash(tuned)[:16]
    assert manifest["config"]["backbone"]["normalization"] == NORMALIZATION_INCEPTION
    det = Detector.load(run / "svm" / "detector.pt")
    assert det.parts["normalization"] == NORMALIZATION_INCEPTION
    assert det._network().net.transform_input
    # The detector computes the cached features (same weights, same input) for a test image.
    from rcnn.config import load_config
    from rcnn.datasets import build_dataset
    from rcnn.store import StageStore

    cfg = load_config(args)
    ds = build_dataset(cfg.dataset)
    image_id = ds.image_ids(ds.test_split)[0]
    store = StageStore.open(run, "features", features["key"])
    proposals = StageStore.open(run, "proposals", store.identity["inputs"]["proposals"])
    boxes = proposals.get(image_id)["boxes"]
    np.testing.assert_allclose(det.features(ds.load_image(image_id), boxes).astype(np.float32),
                               np.asarray(store.get_array(image_id), np.float32), rtol=1e-2, atol=1e-2)  # fmt: skip


@pytest.mark.parametrize("source", ["imagenet", "none"])
def test_multibox_boxes_are_identical_after_saving_and_reloading(source, imagenet_hub, tmp_path):
    from omegaconf import OmegaConf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    gts = [np.array([[0.1, 0.2, 0.6, 0.8]], np.float32), np.array([[0.3, 0.3, 0.9, 0.9]], np.float32)] * 2
    priors = cluster_priors(np.concatenate(gts), 2)
    cfg = OmegaConf.create(dict(epochs=1, batch_size=2, lr=1e-3, weight_decay=0.0, alpha=0.3, flip=True))
    weights = resolve_weights(source)
    model, _ = train_multibox(images, gts, priors, cfg, weights, tmp_path / "ck.pt", progress=False)
    assert model.trunk.transform_input == (source == "imagenet")
    before = predict(model, images)
    reloaded = load_model(export_model(tmp_path / "ck.pt", tmp_path / "model.pt"))
    assert reloaded.trunk.transform_input == (source == "imagenet")
    after = predict(reloaded, images)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])

