import json
import urllib.error

import numpy as np
import pytest
import torch

from features import backbone as BB
from features.backbone import BackboneError, build_googlenet, trunk
from features.extract import RegionFeatures, features_roi, features_warp
from features.stage import gt_entry, resolved_feature_settings
from features.warp import context_boxes, warp_crops
from rcnn.config import load_config
from rcnn.run import main
from rcnn.store import StageStore


def test_context_box_by_hand():
    # A 64 px box: x 224/192 = 7/6 about its centre (82, 82): half side 32 * 7/6 = 37.333.
    e = context_boxes(torch.tensor([[50.0, 50.0, 114.0, 114.0]]), 224, 16)[0]
    torch.testing.assert_close(e, torch.tensor([82 - 112 / 3, 82 - 112 / 3, 82 + 112 / 3, 82 + 112 / 3]))


def test_warp_samples_the_enlarged_box_uniformly():
    h, w = 120, 160
    ramp = torch.arange(w, dtype=torch.float64).expand(3, h, w).clone()  # value = column index
    crop = warp_crops(ramp, torch.tensor([[50.0, 40.0, 114.0, 80.0]], dtype=torch.float64))[0, 0]
    e = context_boxes(torch.tensor([[50.0, 40.0, 114.0, 80.0]], dtype=torch.float64))[0]
    x = e[0] + (torch.arange(224, dtype=torch.float64) + 0.5) * (e[2] - e[0]) / 224  # continuous x of columns
    torch.testing.assert_close(crop[100], x - 0.5)  # bilinear on a ramp returns the position (pixel centres at +0.5)
    # The box itself fills the inner 192 columns: column 16's centre is 1/6 px inside its left edge.
    assert float(x[16]) == pytest.approx(50 + 0.5 * 64 / 192)


def test_box_at_the_border_is_mean_filled_outside():
    img = torch.ones(3, 100, 100)  # normalised image: 0 is the mean
    crop = warp_crops(img, torch.tensor([[0.0, 0.0, 64.0, 64.0]]))[0, 0]
    # Enlarged box starts at -16/3; column u samples x = -16/3 + (u + 0.5) / 3, inside from u = 16 on.
    assert (crop[:, :16] == 0).all() and (crop[:16, :] == 0).all()
    torch.testing.assert_close(crop[16:, 16:], torch.ones(208, 208))


def test_box_larger_than_the_image():
    img = torch.ones(3, 30, 40)
    crop = warp_crops(img, torch.tensor([[-10.0, -10.0, 50.0, 40.0]]))[0, 0]
    # x = -15 + (u + 0.5) * 70 / 224 is in [0, 40] for u = 48 ... 175; y = -85/6 + (v + 0.5) * 175/672 in [0, 30]
    cols = (crop != 0).any(dim=0).nonzero().flatten()
    rows = (crop != 0).any(dim=1).nonzero().flatten()
    assert (cols.min().item(), cols.max().item()) == (48, 175)
    y = -85 / 6 + (np.arange(224) + 0.5) * (175 / 3) / 224
    inside = np.flatnonzero((y >= 0) & (y <= 30))
    assert (rows.min().item(), rows.max().item()) == (inside.min(), inside.max())
    assert warp_crops(img, torch.zeros((0, 4))).shape == (0, 3, 224, 224)


def model(seed=0, split="inception4e"):
    torch.manual_seed(seed)
    return RegionFeatures(build_googlenet("none")[0], split)


def test_region_features_are_googlenets_pool_and_deterministic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 50], [0, 0, 120, 90], [70, 20, 118, 88]], np.float32)
    m = model()
    a = features_warp(m, rgb, boxes, batch_size=2)
    b = features_warp(model(), rgb, boxes)
    assert a.dtype == np.float16 and a.shape == (3, 1024)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=1e-4)  # any batch size
    torch.manual_seed(123)  # random weights do not depend on the global generator: same network anywhere
    np.testing.assert_array_equal(features_warp(model(), rgb, boxes, batch_size=2), a)
    assert np.abs(a.astype(np.float32)).mean() > 1e-2  # random features are not vanishingly small (float16!)
    net = trunk(m.net)
    with torch.inference_mode():
        from features.warp import normalize_image

        ref = net(warp_crops(normalize_image(rgb), torch.from_numpy(boxes))).numpy().astype(np.float16)
    np.testing.assert_allclose(a.astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-3)
    for split in ("inception4e", "inception5a", "inception5b"):
        r = features_roi(model(split=split), rgb, boxes, image_size=90)
        assert r.shape == (3, 1024) and np.isfinite(r.astype(np.float32)).all()


def test_weights_from_a_file(tmp_path):
    net, _ = build_googlenet("none")
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = net(x)
        for name in ("sd.pt", "ckpt.pt"):
            loaded, info = build_googlenet(str(tmp_path / name))
            assert info.kind == "file" and info.stamp
            torch.testing.assert_close(loaded(x), want)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BackboneError, match="other.pt: not GoogLeNet weights"):
        build_googlenet(str(tmp_path / "other.pt"))
    with pytest.raises(BackboneError, match="nope.pt: backbone weights file not found"):
        build_googlenet(str(tmp_path / "nope.pt"))


def test_offline_imagenet_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(BB, "imagenet_weights_path", lambda: tmp_path / "hub" / "googlenet-1378be20.pth")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(BB.GoogLeNet_Weights.IMAGENET1K_V1.__class__, "get_state_dict", no_network)
    with pytest.raises(BackboneError) as e:
        build_googlenet("imagenet")
    msg = str(e.value)
    assert "could not download GoogLeNet's ImageNet weights" in msg and "googlenet-1378be20.pth" in msg
    assert str(tmp_path / "hub") in msg and "backbone.weights=none" in msg
    want = "imagenette" if BB.SHIPPED_PATH.is_file() else "none"
    assert BB.resolve_weights("auto").kind == want  # auto falls back to the shipped backbone, else random (logged)


def test_array_entries_round_trip_memory_mapped(tmp_path):
    s = StageStore(tmp_path, "features", {"mode": "warp"})
    feats = np.random.default_rng(0).normal(size=(5, 1024)).astype(np.float16)
    s.put_array("img 1", feats)
    got = s.get_array("img 1")
    assert isinstance(got, np.memmap) and got.dtype == np.float16
    np.testing.assert_array_equal(got, feats)
    assert s.has("img 1") and len(s) == 1


@pytest.mark.parametrize("mode", ["warp", "roi"])
def test_features_stage(tmp_path, mode):
    args = [
        "progress=false", "stage=features", f"features.mode={mode}", "proposals.method=ss", "proposals.top_n=20",
        "dataset.train_images=2", "dataset.test_images=1", "dataset.width=128", "dataset.height=96",
        "dataset.min_size=24", "dataset.max_size=60", f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}",
        "backbone.weights=none", "workers=1", "finetune.enabled=false",
    ]  # fmt: skip
    assert main(args) == 0
    m = json.loads((tmp_path / "run" / "features" / "metrics.json").read_text())
    assert m["mode"] == mode and m["device"] == "cpu" and m["images"] == 3 and m["crops_per_second"] > 0
    assert m["bytes_per_image"] > 20 * 1024 * 2 * 0.5
    feats = StageStore.open(tmp_path / "run", "features", m["key"])
    props = StageStore.open(tmp_path / "run", "proposals", json.loads((tmp_path / "run" / "proposals" / "metrics.json").read_text())["key"])
    for image_id in ["train_0000", "train_0001", "test_0000"]:
        assert feats.get_array(image_id).shape == (len(props.get(image_id)["boxes"]), 1024)
    for image_id in ["train_0000", "train_0001"]:  # the SVMs' positives: features of the ground truth
        assert feats.get_array(gt_entry(image_id)).shape[1] == 1024
    assert not feats.has(gt_entry("test_0000"))
    assert main(args) == 0  # cached: nothing recomputed
    assert json.loads((tmp_path / "run" / "features" / "metrics.json").read_text())["images_computed_now"] == 0


def test_folding_batchnorm_keeps_the_outputs():
    from features.backbone import fold_batchnorm

    torch.manual_seed(1)
    net, _ = build_googlenet("none")
    for m in net.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)


def test_images_decoded_by_worker_processes_give_the_same_features(tmp_path):
    """Two decoding workers give the entries of decoding in line, image for image."""
    common = [
        "progress=false", "stage=features", "proposals.method=ss", "proposals.top_n=70", "dataset.train_images=2",
        "dataset.test_images=1", "dataset.width=128", "dataset.height=96", "dataset.min_size=24",
        "dataset.max_size=60", f"dataset.root={tmp_path / 'demo'}", "backbone.weights=none", "workers=1",
        "features.batch_size=32", "finetune.enabled=false",
    ]  # fmt: skip
    assert main([*common, f"out={tmp_path / 'a'}", "features.loader_workers=0"]) == 0
    assert main([*common, f"out={tmp_path / 'b'}", "features.loader_workers=2"]) == 0
    a = sorted((tmp_path / "a" / "features").glob("*/entries/*.npy"))
    b = sorted((tmp_path / "b" / "features").glob("*/entries/*.npy"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3 + 2  # + ground truth of 2 train images
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.load(x), np.load(y))


def test_non_finite_features_are_refused_with_the_image_named(tmp_path):
    from features.stage import ImageBoxes, put_features

    store = StageStore(tmp_path, "features", {"mode": "warp"})
    feats = np.ones((3, 1024), np.float16)
    feats[2, 5] = np.nan
    with pytest.raises(FloatingPointError, match="img_7"):
        put_features(store, "img_7", feats, ImageBoxes(np.zeros((3, 4), np.float32), 1, None))
    assert not store.has("img_7") and not store.has(gt_entry("img_7"))


def test_a_read_only_image_array_is_taken_without_torch_warning():
    """np.asarray(PIL.Image) is read-only (issue #15): the API copies it rather than warn."""
    import warnings

    from PIL import Image

    from features.warp import normalize_image

    rgb = np.asarray(Image.fromarray(np.full((8, 6, 3), 200, np.uint8)))
    assert not rgb.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = normalize_image(rgb)
    assert x.shape == (3, 8, 6)


def test_roi_mode_caps_the_longer_side_so_a_panorama_fits():
    """Issue #13: shorter side to 600 unless the longer side would pass 1000 (Fast R-CNN's cap)."""
    from features.extract import roi_scale

    assert roi_scale(600, 6000, 600, 1000) == pytest.approx(1000 / 6000) and roi_scale(300, 400, 600, 1000) == 2.0
    model = RegionFeatures(build_googlenet("none")[0], "inception5b")
    seen, stem = [], model.stem
    model.stem = lambda x: (seen.append(tuple(x.shape[-2:])), stem(x))[1]
    rgb = np.random.default_rng(0).integers(0, 256, (600, 6000, 3), dtype=np.uint8)
    feats = features_roi(model, rgb, np.array([[0, 0, 300, 300], [5000, 100, 6000, 600]], np.float32), 64, 4)
    assert seen == [(100, 1000)] and feats.shape == (2, 1024)


def test_shrink_image_averages_areas_and_maps_boxes_axis_by_axis():
    from features.warp import shrink_image

    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    for limit in (None, 400, 500):  # never enlarged
        same, scale = shrink_image(rgb, limit)
        assert same is rgb and scale.tolist() == [1, 1, 1, 1]
    small, scale = shrink_image(rgb, 100)
    assert small.shape == (75, 100, 3) and scale.tolist() == [0.25] * 4
    blocks = rgb.reshape(75, 4, 100, 4, 3).astype(np.float64).mean((1, 3))  # each pixel its 4x4 block's mean
    np.testing.assert_allclose(small, blocks, atol=0.51)
    odd, scale = shrink_image(np.ascontiguousarray(rgb[:, :397]), 100)  # 397x300 -> 100x76
    assert odd.shape == (76, 100, 3) and scale.tolist() == pytest.approx([100 / 397, 76 / 300] * 2)


def test_warp_features_come_from_the_image_shrunk_to_max_side():
    """features.max_side: a large image's crops are warped from it shrunk (its boxes mapped there), in warp
    mode; roi mode scales by its own settings; the setting is part of the features' key only where it is set."""
    from features.extract import region_features
    from features.warp import shrink_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 120, 100], [0, 0, 200, 160], [150, 20, 196, 150]], np.float32)
    m = model()
    fc = {"mode": "warp", "input_size": 64, "padding": 4, "max_side": 100}
    small, scale = shrink_image(rgb, 100)
    np.testing.assert_array_equal(region_features(m, rgb, boxes, fc, "cpu"), features_warp(m, small, boxes * scale, 64, 4))
    full = features_warp(m, rgb, boxes, 64, 4)
    np.testing.assert_array_equal(region_features(m, rgb, boxes, {**fc, "max_side": 200}, "cpu"), full)
    np.testing.assert_array_equal(region_features(m, rgb, boxes, {k: v for k, v in fc.items() if k != "max_side"}, "cpu"), full)

    def settings(*overrides):
        return resolved_feature_settings(load_config(["dataset.recipe=[]", *overrides]).features, torch.device("cpu"))

    assert "max_side" not in settings() and settings("features.max_side=800")["max_side"] == 800
    assert "max_side" not in settings("features.mode=roi", "features.max_side=800")


def test_roi_only_settings_shape_no_warp_key():
    """The features' and the fine-tuned network's keys read these settings: in warp mode the roi pooling's layer
    and image size shape nothing, so they must not split the cache (the route leaves them at any value)."""
    def settings(*overrides):
        return resolved_feature_settings(load_config(["dataset.recipe=[]", *overrides]).features, torch.device("cpu"))

    assert settings("features.mode=warp") == settings("features.mode=warp", "features.roi_image_size=400",
                                                      "features.roi_layer=inception4e")  # fmt: skip
    assert settings("features.mode=roi") != settings("features.mode=roi", "features.roi_image_size=400")
    assert settings("features.mode=warp") != settings("features.mode=warp", "features.input_size=112")


def test_only_train_images_not_detected_on_get_partial_features():
    """svm.classifiers=false: a train image gets only its regressors' proposals, unless the test split (detected on,
    which needs every proposal's feature) holds it too; with the train role not asked for, none."""
    from types import SimpleNamespace

    from features.stage import partial_images

    splits = {"train": ["a", "b", "c"], "test": ["c", "d"]}
    ds = SimpleNamespace(train_split="train", test_split="test", image_ids=lambda split: splits[split])
    cfg = lambda *roles: SimpleNamespace(proposals=SimpleNamespace(splits=list(roles)))  # noqa: E731
    assert partial_images(ds, cfg("train", "test")) == {"a", "b"}
    assert partial_images(ds, cfg("train")) == {"a", "b", "c"}
    assert partial_images(ds, cfg("test")) == set()
    same = SimpleNamespace(train_split="train", test_split="train", image_ids=lambda split: splits[split])
    assert partial_images(same, cfg("train", "test")) == set()  # one split for both roles: every image whole
