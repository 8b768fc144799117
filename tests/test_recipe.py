"""The default route (auto=true): settings chosen from the device and the data, the command line winning."""

import json

import pytest

from rcnn.config import load_config
from rcnn.recipe import DataFacts, as_overrides, choose
from rcnn.run import main

from .fakes import write_voc

SMALL = DataFacts(train_images=160, train_boxes=200, classes=1, median_object_side=150.0, small_object_side=60.0,
                  median_long_side=500.0, small_object_side_ss=60.0)  # fmt: skip
LARGE = DataFacts(train_images=630, train_boxes=5000, classes=5, median_object_side=40.0, small_object_side=11.0,
                  median_long_side=400.0, small_object_side_ss=11.0)  # fmt: skip


def by_key(choices) -> dict:
    return {c.key: c.value for c in choices}


def test_a_cpu_gets_small_warped_crops_and_600_fine_tuning_steps():
    small, large = by_key(choose(SMALL, "cpu")), by_key(choose(LARGE, "cpu"))
    for r in (small, large):
        assert r["proposals.method"] == "ss" and r["features.mode"] == "warp" and r["finetune.enabled"] is True
        assert r["features.input_size"] == 64 and r["finetune.batch_size"] == 64 and r["svm.folds"] == 2
        assert r["finetune.bg_candidates"] == 4 and r["finetune.lr"] == 0.02
        assert r["svm.C"] is None and r["finetune.step_size"] < r["finetune.iterations"]
    assert small["finetune.iterations"] == 600 and large["finetune.iterations"] == 600  # a CPU: 600 for any number of boxes
    roadsigns = by_key(choose(DataFacts(614, 856, 4, 44.0, 14.0, 400.0, 14.0), "cpu"))  # roadsigns' training split
    assert roadsigns["finetune.iterations"] == 600 and roadsigns["proposals.top_n"] == 400  # as measured there
    assert roadsigns["proposals.ss.merge_iou"] == 0.7 and "proposals.ss.merge_iou" not in by_key(choose(LARGE, "cuda"))
    assert roadsigns["detect.scores"] == "softmax" and "detect.scores" not in by_key(choose(LARGE, "cuda"))
    assert roadsigns["svm.classifiers"] is False and "svm.classifiers" not in by_key(choose(LARGE, "cuda"))
    assert by_key(choose(DataFacts(100, 150, 1, 40.0, 20.0, 400.0, 20.0), "cpu"))["finetune.iterations"] == 600
    # Fewer training images afford more boxes an image (about 250k crops in all, within 200-1000).
    assert small["proposals.top_n"] == 1000 and large["proposals.top_n"] == 400
    assert by_key(choose(DataFacts(5000, 9000, 5, 40.0, 11.0, 400.0, 11.0), "cpu"))["proposals.top_n"] == 200
    # Small objects keep small proposals; large ones do not.
    assert large["proposals.ss.min_box_side"] == 8 and small["proposals.ss.min_box_side"] == 20


def test_large_photos_are_searched_and_warped_shrunk(tmp_path):
    """Selective search's time grows faster than the pixels and a 12-MP photo is 146 MB as floats: the route
    searches at most 500 px and warps from at most 800 (a GPU 1333), its small boxes sized where the search runs."""
    phones = DataFacts(300, 900, 2, 300.0, 120.0, 4032.0, 14.9)  # 120-px objects at full size, 14.9 at 500 px
    for device, side in (("cpu", 800), ("cuda", 1333)):
        r = by_key(choose(phones, device))
        assert r["proposals.ss.max_side"] == 500 and r["features.max_side"] == side
        assert r["proposals.ss.min_box_side"] == 11  # 0.8 x 14.9, not the 20 that 120 px would give
    from rcnn.datasets import build_dataset
    from rcnn.recipe import data_facts

    root = write_voc(tmp_path / "big", {f"im{k}": [("sign", 10, 10, 110 + k, 110 + k)] for k in range(3)},
                     {"train": ["im0", "im1", "im2"], "test": ["im0"]}, width=1000, height=750)  # fmt: skip
    facts = data_facts(build_dataset(load_config(["dataset=voc", f"dataset.root={root}", "dataset.train_split=train"]).dataset))
    assert facts.median_long_side == 1000 and facts.median_object_side == pytest.approx(102)  # (VOC counts both end pixels)
    assert facts.small_object_side_ss == pytest.approx(facts.small_object_side / 2)


def test_a_cpu_with_bfloat16_gets_larger_crops(voc, monkeypatch):
    fp32, bf16 = by_key(choose(LARGE, "cpu")), by_key(choose(LARGE, "cpu", bf16=True))
    assert (fp32["features.input_size"], fp32["features.padding"]) == (64, 4)
    assert (bf16["features.input_size"], bf16["features.padding"]) == (96, 6)
    assert {k: v for k, v in fp32.items() if not k.startswith("features.")} == {
        k: v for k, v in bf16.items() if not k.startswith("features.")}  # the crops alone differ
    # route() asks the CPU, and features.precision=fp32 sizes the crops as on an fp32-only CPU
    from rcnn.datasets import build_dataset
    from rcnn.recipe import route

    base = ["dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "device=cpu"]
    ds = build_dataset(load_config(base).dataset)
    for native, extra, size in ((True, [], 96), (False, [], 64), (True, ["features.precision=fp32"], 64),
                                (True, ["features.precision=bf16"], 96), (False, ["features.precision=bf16"], 64)):
        monkeypatch.setattr("rcnn.machine.native_bf16", lambda device_type="cpu", native=native: native)
        args = [*base, *extra]
        assert f"features.input_size={size}" in route(load_config(args), args, ds)[0], (native, extra)


def test_a_gpu_gets_rcnns_warped_crops_and_multibox():
    gpu = by_key(choose(LARGE, "cuda"))
    assert gpu["features.mode"] == "warp" and gpu["features.input_size"] == 224
    assert gpu["proposals.method"] == "ss_multibox"
    assert gpu["finetune.lr"] == 0.01  # the CPU's 0.02 was measured on 64-96 px crops and 600 steps only
    assert gpu["multibox.patience"] >= 1 and "multibox.patience" not in by_key(choose(LARGE, "cpu"))
    assert gpu["finetune.iterations"] > by_key(choose(LARGE, "cpu"))["finetune.iterations"]
    assert by_key(choose(SMALL, "cuda"))["finetune.iterations"] == 600  # 200 boxes: the fewest steps, as on a CPU
    # half the foreground windows a step: more steps for the same looks at each box (3750 -> 4000, the most)
    assert by_key(choose(LARGE, "cuda"))["finetune.iterations"] == 3750
    assert by_key(choose(LARGE, "cuda", fg_per_step=16))["finetune.iterations"] == 4000


def test_every_choice_is_a_valid_override():
    for facts in (SMALL, LARGE):
        for device, bf16 in (("cpu", False), ("cpu", True), ("cuda", False)):
            cfg = load_config(["dataset.recipe=[]"], defaults=as_overrides(choose(facts, device, bf16)))
            for c in choose(facts, device, bf16):
                value = cfg
                for part in c.key.split("."):
                    value = value[part]
                value = getattr(value, "value", value)
                assert (list(value) if c.key == "svm.C_grid" else value) == c.value, c.key


@pytest.fixture
def voc(tmp_path):
    images = {f"im{k}": [("sign", 4 + k, 4, 20 + k, 22)] for k in range(6)}
    return write_voc(tmp_path / "voc", images, {"train": [f"im{k}" for k in range(4)], "test": ["im4", "im5"]})


def test_the_route_is_said_recorded_and_the_command_line_wins(voc, tmp_path, caplog):
    args = ["stage=data", "dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "progress=false",
            f"out={tmp_path / 'run'}", "finetune.iterations=7"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "auto: settings chosen from the device and the data" in caplog.text and "features.mode=warp" in caplog.text
    assert "  svm.C=null  (" in caplog.text and "  finetune.enabled=true  (" in caplog.text  # as the command line takes them
    recipe = {r["key"]: r for r in json.loads((tmp_path / "run" / "data" / "metrics.json").read_text())["recipe"]}
    assert recipe["features.mode"]["applied"] and recipe["features.mode"]["why"]
    assert not recipe["finetune.iterations"]["applied"]  # the command line set it
    assert "kept as given: finetune.iterations" in caplog.text


def test_the_route_reasons_with_the_foreground_windows_asked_for(voc, tmp_path):
    from rcnn.datasets import build_dataset
    from rcnn.recipe import route

    for extra, fg in (([], 32), (["finetune.fg_per_batch=16"], 16)):
        args = ["dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "device=cpu", *extra]
        cfg = load_config(args)
        why = {r["key"]: r["why"] for r in route(cfg, args, build_dataset(cfg.dataset))[1]}["finetune.iterations"]
        assert why.startswith(f"{fg} foreground windows a step: each of the 4 training boxes seen about {600 * fg // 4} times")


def test_detecting_with_a_trained_detector_leaves_its_scoring_to_the_detector(voc, tmp_path):
    """The route's detect.* choices are for a run that trains its own detector; with detector= or ensemble= the
    detector file's own scoring applies (a detector trained without fine-tuning has no softmax)."""
    from rcnn.datasets import build_dataset
    from rcnn.recipe import route

    base = ["dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "device=cpu"]
    ds = build_dataset(load_config(base).dataset)
    trains, _ = route(load_config(base), base, ds)
    assert "detect.scores=softmax" in trains and "svm.classifiers=false" in trains
    off = [*base, "finetune.enabled=false"]  # no fine-tuning, no classifier: the SVMs score
    assert not [o for o in route(load_config(off), off, ds)[0] if o.startswith(("detect.scores", "svm.classifiers"))]
    svms = [*base, "detect.scores=svm"]  # the SVMs asked for: they are trained
    assert "svm.classifiers=false" not in route(load_config(svms), svms, ds)[0]
    soft = [*base, "detect.scores=softmax"]
    assert "svm.classifiers=false" in route(load_config(soft), soft, ds)[0]
    for given in ("detector=a/detector.pt", "ensemble=[a.pt,b.pt]"):
        detects, record = route(load_config([*base, given]), [*base, given], ds)
        assert not [o for o in detects if o.startswith("detect.")] and "features.mode=warp" in detects
        assert "detect.scores" not in {r["key"] for r in record}
    # image= alone detects with this configuration's own detector: trained (or found) with the route's scoring
    photos = [*base, "image=photo.jpg"]
    assert route(load_config(photos), photos, ds)[0] == trains


def test_auto_false_keeps_rcnns_defaults(voc, tmp_path, caplog):
    args = ["stage=data", "dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "progress=false",
            f"out={tmp_path / 'run'}", "auto=false"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "auto:" not in caplog.text
    assert "recipe" not in json.loads((tmp_path / "run" / "data" / "metrics.json").read_text())


def brute_nms_removed(group, t) -> int:
    """Greedy NMS by hand, larger boxes first: how many of ``group`` it removes."""
    import numpy as np

    area = (group[:, 2] - group[:, 0]) * (group[:, 3] - group[:, 1])
    kept = []
    for i in np.argsort(-area, kind="stable"):
        a = group[i]
        ious = [max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1])) for b in kept]
        ious = [x / (area[i] + (b[2] - b[0]) * (b[3] - b[1]) - x) for x, b in zip(ious, kept)]
        if all(v <= t for v in ious):
            kept.append(a)
    return len(group) - len(kept)


@pytest.mark.parametrize("seed", range(3))
def test_nms_losses_match_greedy_nms_by_hand(seed):
    import numpy as np

    from rcnn.recipe import NMS_CHOICES, nms_losses

    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(20):  # crowds: boxes of one class in one image, many overlapping
        xy = rng.uniform(0, 100, (int(rng.integers(1, 9)), 2))
        wh = rng.uniform(10, 40, xy.shape)
        groups.append(np.concatenate([xy, xy + wh], 1).astype(np.float32))
    total = sum(len(g) for g in groups)
    for t, lost in nms_losses(groups):
        assert lost == pytest.approx(sum(brute_nms_removed(g, t) for g in groups) / total)
    assert [t for t, _ in nms_losses(groups)] == list(NMS_CHOICES)


def test_nms_follows_how_much_the_training_objects_overlap():
    """R-CNN's 0.3 where the objects of a class barely overlap; for a class whose objects crowd, the least overlap
    that keeps 99% of them apart; each image's boxes of a class and the split's detections grow with dense images."""
    import numpy as np

    from rcnn.recipe import class_nms_losses, nms_choice, nms_losses

    apart = [np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)]
    assert nms_choice(nms_losses(apart)) == 0.3 and nms_choice(()) == 0.3 and nms_choice(nms_losses([])) == 0.3
    pair = np.array([[0, 0, 10, 10], [0, 0, 10, 5.5]], np.float32)  # IoU 0.55: NMS at 0.6 and above keeps both
    assert nms_choice(nms_losses([pair] + apart * 40)) == 0.6  # 1 of 82 objects lost below it: more than 1%
    assert nms_choice(nms_losses([pair] + apart * 60)) == 0.3  # 1 of 122: within it
    assert nms_choice(((0.3, 0.5), (0.4, 0.4), (0.5, 0.3), (0.6, 0.2), (0.7, 0.1))) == 0.7  # never: the largest tried
    # per class: a crowded class does not loosen the others' NMS
    pairs = [(pair, np.array([1, 1])), (apart[0], np.array([0, 0]))] + [(apart[0], np.array([0, 2]))] * 30
    per_class = class_nms_losses(pairs, 4)
    assert [nms_choice(lost) for lost in per_class] == [0.3, 0.6, 0.3, 0.3]  # class 3: no training object
    plain = by_key(choose(SMALL, "cpu"))
    assert (plain["detect.nms_iou"], plain["detect.max_per_class"], plain["detect.max_per_class_split"]) == (None, 100, 40)
    zero = tuple((t, 0.0) for t in (0.3, 0.4, 0.5, 0.6, 0.7))
    people = ((0.3, 0.024), (0.4, 0.012), (0.5, 0.004), (0.6, 0.004), (0.7, 0.0))
    crowd = DataFacts(128, 254, 2, 60.0, 12.0, 640.0, 10.0, most_of_a_class=60, densest_per_image=25.0,
                      class_nms_losses=(zero, people), class_names=("sign", "person"))  # fmt: skip
    dense = [c for c in choose(crowd, "cpu") if c.key.startswith("detect.") and c.key != "detect.scores"]
    assert [(c.key, c.value) for c in dense] == [("detect.nms_iou", None), ("detect.max_per_class", 300),
                                                 ("detect.max_per_class_split", 75)]  # fmt: skip
    assert "person at 0.5 (R-CNN's 0.3 would remove 2.4% of its training objects" in dense[0].why and "sign" not in dense[0].why



def test_photos_are_detected_by_the_detector_the_route_trained(voc, tmp_path):
    """README: "with the same keys, stage=detect image=photos/ draws the detector's boxes". The route's scoring
    choice shapes the detector, so detection in photos keeps it (it used to drop it, and stopped there as if
    another detector were asked for)."""
    out = tmp_path / "run"
    args = ["dataset=voc", f"dataset.root={voc}", "dataset.train_split=train", "progress=false", f"out={out}",
            "device=cpu", "workers=1", "backbone.weights=none", "finetune.iterations=2"]  # fmt: skip
    assert main(args) == 0  # the chain, down to its evaluation

    def built():
        return {m.parent.name for m in (out / "svm").glob("*/manifest.json") if json.loads(m.read_text())["complete"]}

    before = built()
    assert main([*args, "stage=detect", f"image={voc / 'JPEGImages' / 'im4.jpg'}"]) == 0
    assert built() == before and (out / "detect" / "images" / "im4.png").is_file()
    assert json.loads((out / "detect" / "images" / "metrics.json").read_text())["scores"] == "softmax"
