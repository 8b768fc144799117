"""The backbone shipped in the repository: its compact float16 file, `imagenette`, and `auto` offline."""

import numpy as np
import pytest
import torch
from torchvision.models import googlenet

from features import backbone as BB
from features import shipped
from features.backbone import NORMALIZATION_IMAGENET, WEIGHTS_FORMAT, build_googlenet, resolve_weights

from .test_weights import features_of


def _pretrained_file(path, seed=3):
    """A stand-in for stage=pretrain's model.pt: its format, aux heads and a 10-way classifier, random values."""
    net = BB.random_init(googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=10))
    g = torch.Generator().manual_seed(seed)
    state = {k: v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}  # fmt: skip
    torch.save({"format": WEIGHTS_FORMAT, "backbone": state, "normalization": NORMALIZATION_IMAGENET,
                "classes": sorted(shipped.IMAGENETTE_NAMES), "input_size": 64, "source": "test"}, path)  # fmt: skip
    return path


@pytest.fixture
def shipped_file(tmp_path, monkeypatch):
    """A compact file made from a stand-in pretraining run, where the repository's shipped file would be."""
    src = _pretrained_file(tmp_path / "model.pt")
    dst = tmp_path / "weights" / "googlenet-imagenette.pt"
    shipped.compact(src, dst, {"top1_center": 0.5, "epochs": 1}, commit="abc1234")
    monkeypatch.setattr(BB, "SHIPPED_PATH", dst)
    monkeypatch.setattr(BB, "_warned", set())
    return src, dst


def test_compact_file_is_half_the_size_and_within_tolerance_of_its_source(shipped_file):
    src, dst = shipped_file
    assert dst.stat().st_size < 0.55 * src.stat().st_size  # float16, no auxiliary heads
    saved = torch.load(dst, weights_only=True)
    assert not any(k.startswith("aux") for k in saved["backbone"])
    assert {v.dtype for k, v in saved["backbone"].items() if v.is_floating_point()} == {torch.float16}
    info = shipped.describe(dst)
    assert info["class_names"][0] == "tench" and info["input_size"] == 64 and info["commit"] == "abc1234"
    assert info["top1_center"] == 0.5 and info["normalization"] == NORMALIZATION_IMAGENET
    assert 0 < shipped.check(dst) <= shipped.FP16_TOLERANCE  # rounded (not 0), within the stated bound
    # The check compares with the float32 source's features: a file whose weights drift fails it.
    saved["backbone"]["conv1.conv.weight"] *= 1.1
    torch.save(saved, dst)
    assert shipped.check(dst) > shipped.FP16_TOLERANCE


def test_imagenette_loads_the_shipped_file_with_its_normalisation(shipped_file):
    src, dst = shipped_file
    w = resolve_weights("imagenette")
    assert w.kind == "imagenette" and w.path == str(dst) and w.normalization == NORMALIZATION_IMAGENET
    assert w.stamp.startswith("sha256:")
    half, _ = build_googlenet("imagenette")
    full, _ = build_googlenet(str(src))
    assert not half.transform_input
    a, b = features_of(half).astype(np.float32), features_of(full).astype(np.float32)
    assert np.abs(a - b).max() <= shipped.FP16_TOLERANCE * np.abs(b).max()


def test_auto_offline_uses_the_shipped_backbone_and_says_so(shipped_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no ImageNet file cached; RCNN_OFFLINE is set
    with caplog.at_level("WARNING"):
        w = resolve_weights("auto")
    assert w.describe() == resolve_weights("imagenette").describe()
    assert "backbone.weights=imagenette" in caplog.text and "RCNN_OFFLINE is set" in caplog.text
    assert "RANDOM" not in caplog.text


def test_imagenette_without_the_file_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(BB, "SHIPPED_PATH", tmp_path / "gone.pt")
    with pytest.raises(BB.BackboneError, match="gone.pt: the shipped imagenette backbone is missing"):
        resolve_weights("imagenette")


@pytest.mark.skipif(not BB.SHIPPED_PATH.is_file(), reason="no shipped backbone in this checkout")
def test_the_repositorys_shipped_backbone_matches_its_float32_source():
    info = shipped.describe()
    assert info["format"] == WEIGHTS_FORMAT and len(info["classes"]) == 10 and info["input_size"] >= 96
    assert shipped.check() <= shipped.FP16_TOLERANCE
    assert BB.SHIPPED_PATH.stat().st_size < 15e6
