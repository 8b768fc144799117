import json

import numpy as np
import pytest
import torch

from features.backbone import build_googlenet
from features.finetune import FineTuner, Windows, label_windows
from rcnn.config import load_config
from rcnn.run import main


def test_windows_are_labelled_by_their_best_ground_truth():
    gt = np.array([[0, 0, 10, 10], [20, 0, 40, 20]], np.float32)
    props = np.array([[0, 0, 10, 9], [20, 0, 40, 12], [0, 0, 10, 4], [50, 50, 60, 60]], np.float32)
    w = label_windows([props], [(gt, np.array([2, 0]))], fg_iou=0.5)
    # Ground truth first (its own class), then proposals: IoU 0.9 -> class 2, 0.6 -> class 0, 0.4 and 0 -> background.
    assert w.labels.tolist() == [3, 1, 3, 1, 0, 0]
    assert w.image.tolist() == [0] * 6 and w.foreground().tolist() == [0, 1, 2, 3]
    empty = label_windows([props], [(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))])
    assert (empty.labels == 0).all()


def tiny(tmp_path, mode="warp", iterations=4):
    cfg = load_config([
        "dataset.recipe=[]", f"features.mode={mode}", "features.input_size=64", "features.roi_image_size=64",
        f"finetune.iterations={iterations}", "finetune.batch_size=8", "finetune.fg_per_batch=2", "finetune.step_size=2",
    ])  # fmt: skip
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    gts = [(np.array([[5, 5, 30, 30], [30, 10, 60, 45]], np.float32), np.array([0, 1])) for _ in range(3)]
    props = [np.concatenate([g[0] + rng.normal(0, 2, (2, 4)), rng.uniform(0, 30, (6, 2)).repeat(2, 1) + [0, 0, 15, 15]]).astype(np.float32) for g in gts]
    windows = label_windows(props, gts)

    def make():
        torch.manual_seed(0)
        return FineTuner(build_googlenet("none")[0], 2, windows, lambda k: images[k], cfg.finetune, cfg.features, seed=0)

    return make, cfg


def test_batches_have_the_asked_foreground_share(tmp_path):
    make, _ = tiny(tmp_path)
    t = make()
    idx = t.sample()
    assert len(idx) == 8
    assert (t.windows.labels[idx[:2]] > 0).all() and (t.windows.labels[idx[2:]] == 0).all()


@pytest.mark.parametrize("balance, share", [(0.0, 0.9), (0.5, 0.75), (1.0, 0.5)])
def test_foreground_classes_share_batches_as_fg_balance_asks(balance, share):
    # 90 windows of class 1, 10 of class 2, 100 background: class 1's share of the foreground draws is
    # 90 * 90**-b / (90 * 90**-b + 10 * 10**-b): 0.9 uniform, 0.75 at b = 0.5, 0.5 balanced
    labels = np.array([1] * 90 + [2] * 10 + [0] * 100)
    windows = Windows(np.zeros(200, np.int64), np.tile([0, 0, 10, 10], (200, 1)).astype(np.float32), labels)
    cfg = load_config(["dataset.recipe=[]", "finetune.batch_size=64", "finetune.fg_per_batch=32", f"finetune.fg_balance={balance}"])
    t = FineTuner(build_googlenet("none")[0], 2, windows, lambda k: None, cfg.finetune, cfg.features, seed=0)
    drawn = np.concatenate([t.sample() for _ in range(200)])
    fg = labels[drawn][labels[drawn] > 0]
    assert len(fg) == 200 * 32 and (labels[drawn] == 0).sum() == 200 * 32
    assert abs(np.mean(fg == 1) - share) < 0.02


def test_hard_background_keeps_the_candidates_scored_least_as_background(tmp_path):
    """finetune.bg_candidates=k: k x the background draws, of which a step keeps those the network (in eval mode,
    as the features see it) gives the lowest background log-probability; checked against one window at a time."""
    make, cfg = tiny(tmp_path)
    cfg.finetune.bg_candidates = 3
    t = make()
    t.step()  # a trained step first: the scores are not the initial network's
    idx = t.sample(3)
    assert len(idx) == 2 + 6 * 3 and (t.windows.labels[idx[2:]] == 0).all()
    flips = np.arange(len(idx)) % 2 == 1
    kept = t.hardest_background(idx, flips)
    t.model.eval()
    with torch.no_grad():
        log_bg = [t.model.net.fc(t._features(idx[[p]], flips[[p]])).log_softmax(1)[0, 0].item() for p in range(2, len(idx))]
    want = sorted(range(2, len(idx)), key=lambda p: (log_bg[p - 2], p))[:6]
    assert kept.tolist() == [0, 1] + sorted(want)
    record = t.step()  # a step with the selection trains on a batch of the usual size
    assert record["iteration"] == 2 and np.isfinite(record["loss"])


@pytest.mark.parametrize("mode, bg_candidates", [("warp", 1), ("roi", 1), ("warp", 3)])
def test_resumed_fine_tuning_equals_an_uninterrupted_run(tmp_path, mode, bg_candidates):
    make, cfg = tiny(tmp_path, mode)
    cfg.finetune.bg_candidates = bg_candidates  # 3: each step keeps the hardest backgrounds of the weights it resumed
    straight = make()
    for _ in range(4):
        straight.step()
    first = make()
    for _ in range(2):
        first.step()
    first.save(tmp_path / "ck.pt")  # killed here
    resumed = make()
    resumed.load(tmp_path / "ck.pt")
    for _ in range(2):
        resumed.step()
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.seconds > first.seconds > 0  # the killed run's steps counted in the time
    np.testing.assert_allclose([h["loss"] for h in resumed.history], [h["loss"] for h in straight.history], rtol=1e-4)
    assert resumed.history[-1]["lr"] == pytest.approx(straight.history[-1]["lr"]) == pytest.approx(0.001 * 0.01)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_image_cache_holds_what_fits_in_its_bytes_and_shrinks_to_max_side():
    from features.finetune import _ImageCache

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(4)]
    loads = []
    one = 3 * 40 * 50 * 4  # bytes of a normalised image
    cache = _ImageCache(lambda k: (loads.append(k), images[k])[1], 2 * one, torch.device("cpu"))
    for k in (0, 1, 0, 2, 0, 1):  # 2 drops 1 (the least recently used); 1 then drops 2
        image, scale = cache(k)
        assert image.shape == (3, 40, 50) and scale.tolist() == [1, 1, 1, 1]
    assert loads == [0, 1, 2, 1] and list(cache.items) == [0, 1] and cache.bytes == 2 * one
    tiny_cache = _ImageCache(lambda k: images[k], 1, torch.device("cpu"))  # smaller than one image: the last kept
    tiny_cache(0), tiny_cache(1)
    assert list(tiny_cache.items) == [1]
    shrunk = _ImageCache(lambda k: images[k], 2 * one, torch.device("cpu"), max_side=25)
    image, scale = shrunk(3)
    assert image.shape == (3, 20, 25) and scale.tolist() == [0.5] * 4


def test_fine_tuning_warps_from_the_image_shrunk_to_max_side(tmp_path):
    """A step's crops with features.max_side are the crops of the shrunk image at the mapped boxes: what the
    features stage warps from (tests/test_features.py)."""
    from features.warp import normalize_image, shrink_image, warp_crops

    make, cfg = tiny(tmp_path)
    cfg.features.max_side = 32
    t = make()
    idx = np.flatnonzero(t.windows.image == 1)
    got = t.crops(idx, np.zeros(len(idx), bool))
    small, scale = shrink_image(t.images.load(1), 32)
    want = warp_crops(normalize_image(small), torch.from_numpy(t.windows.boxes[idx] * scale), 64, cfg.features.padding)
    assert small.shape[:2] == (24, 32)
    torch.testing.assert_close(got, want.contiguous(memory_format=torch.channels_last))


def test_finetune_stage_then_features_use_the_tuned_weights(tmp_path):
    args = [
        "progress=false", "proposals.method=ss", "proposals.top_n=30", "dataset.train_images=3", "dataset.test_images=1",
        "dataset.width=128", "dataset.height=96", "dataset.min_size=24", "dataset.max_size=60",
        f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}", "backbone.weights=none", "workers=1",
        "features.input_size=64", "finetune.iterations=2", "finetune.batch_size=8", "finetune.fg_per_batch=2",
    ]  # fmt: skip
    assert main(["stage=features", "finetune.enabled=false", *args]) == 0  # the demo recipe would fine-tune first
    before = json.loads((tmp_path / "run" / "features" / "metrics.json").read_text())
    assert before["backbone_weights"] == "none"
    assert main(["stage=finetune", *args]) == 0
    ft = json.loads((tmp_path / "run" / "finetune" / "metrics.json").read_text())
    assert ft["iterations"] == 2 and (tmp_path / "run" / "finetune" / "loss.png").exists()
    # C is chosen by cross-validation over cached features (svm.C=null): fine-tuning learns from every image.
    assert ft["train_images"] == 3
    assert main(["stage=features", *args]) == 0
    after = json.loads((tmp_path / "run" / "features" / "metrics.json").read_text())
    assert after["backbone_weights"] == "file" and after["key"] != before["key"]  # new weights, new cache
    assert after["images_computed_now"] == 4
    # Off means off: with the tuned model in the run folder, finetune.enabled=false still measures the backbone.
    assert main(["stage=features", "finetune.enabled=false", *args]) == 0
    off = json.loads((tmp_path / "run" / "features" / "metrics.json").read_text())
    assert off["backbone_weights"] == "none" and off["key"] == before["key"] and off["images_computed_now"] == 0


def test_learning_rates_and_decay_follow_rcnns_fine_tuning_prototxt(tmp_path):
    """Issue #13: the new classifier at 10x, biases at 2x without decay, BatchNorm without decay."""
    make, cfg = tiny(tmp_path)
    t = make()
    lr, wd = cfg.finetune.lr, cfg.finetune.weight_decay
    group = {id(p): g for g in t.opt.param_groups for p in g["params"]}
    net = t.model.net
    assert (group[id(net.fc.weight)]["lr"], group[id(net.fc.weight)]["weight_decay"]) == (pytest.approx(10 * lr), wd)
    assert (group[id(net.fc.bias)]["lr"], group[id(net.fc.bias)]["weight_decay"]) == (pytest.approx(20 * lr), 0.0)
    assert (group[id(net.conv1.conv.weight)]["lr"], group[id(net.conv1.conv.weight)]["weight_decay"]) == (lr, wd)
    assert (group[id(net.conv1.bn.weight)]["lr"], group[id(net.conv1.bn.weight)]["weight_decay"]) == (lr, 0.0)
    assert group[id(net.conv1.bn.bias)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in t.opt.param_groups) == len(list(net.parameters()))
    t.step()
    assert t.history[-1]["lr"] == pytest.approx(lr)


def test_dropout_comes_before_the_classifier(tmp_path):
    make, cfg = tiny(tmp_path)
    cfg.finetune.dropout = 1.0  # every feature dropped: the classifier sees zeros and gives its bias
    t = make()
    t.model.train()
    idx = t.sample()
    logits = t.logits(idx, np.zeros(len(idx), bool), t._dropout(len(idx)))
    torch.testing.assert_close(logits, t.model.net.fc.bias.expand_as(logits))
    cfg.finetune.dropout = 0.4  # inverted dropout: 40% of the features zeroed, the rest scaled by 1 / 0.6
    keep = t._dropout(4000)
    np.testing.assert_allclose(np.unique(keep.numpy()), [0.0, 1 / 0.6], rtol=1e-6)
    assert abs((keep == 0).float().mean().item() - 0.4) < 0.01
    torch.testing.assert_close(keep, t._dropout(4000))  # a function of the step: resumes and ranks agree


def test_roi_mode_flips_the_image_and_its_boxes(tmp_path):
    """Issue #13: a flipped window is the window of the mirrored image (not a mirrored pooled map)."""
    from features.finetune import Windows

    make, cfg = tiny(tmp_path, "roi")
    t = make()
    t.model.eval()
    idx = np.flatnonzero(t.windows.image == 0)
    flipped = t.logits(idx, np.ones(len(idx), bool), None)
    w = t.windows
    mirrored = Windows(w.image, np.stack([64 - w.boxes[:, 2], w.boxes[:, 1], 64 - w.boxes[:, 0], w.boxes[:, 3]], 1), w.labels)
    u = make()
    u.model.load_state_dict(t.model.state_dict())
    u.model.eval()
    u.windows = mirrored
    u.images = lambda k: (t.images(k)[0].flip(-1), t.images(k)[1])
    torch.testing.assert_close(flipped, u.logits(idx, np.zeros(len(idx), bool), None), rtol=1e-4, atol=1e-4)


def test_fp16_fine_tuning_scales_its_loss_so_small_gradients_still_update(tmp_path, monkeypatch):
    """Issue #27: a loss whose gradients underflow in float16 (here the real loss x 1e-7) still moves the
    first layer's weights: the loss is scaled before the fp16 backward pass, as pretraining's."""
    import features.finetune as finetune

    make, cfg = tiny(tmp_path)
    cfg.features.precision = "fp16"
    cross_entropy = finetune.F.cross_entropy
    monkeypatch.setattr(finetune.F, "cross_entropy", lambda *a, **k: cross_entropy(*a, **k) * 1e-7)
    t = make()
    assert t.amp is torch.float16
    t.step()
    grad = t.model.net.conv1.conv.weight.grad  # (weight decay alone would move the weights: look at the gradient)
    nonzero = (grad != 0).float().mean().item()
    assert nonzero > 0.5, f"only {nonzero:.0%} of conv1's gradient survived float16"
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-3  # unscaled before the update
    assert t.scaler.is_enabled()
    t.save(tmp_path / "ck.pt")
    again = make()
    again.load(tmp_path / "ck.pt")
    assert again.scaler.get_scale() == t.scaler.get_scale()  # the scale resumes with the run


@pytest.mark.parametrize("mode", ["warp", "roi"])
def test_frozen_layers_keep_their_weights_and_statistics_and_the_rest_learn(tmp_path, mode):
    make, cfg = tiny(tmp_path, mode, iterations=2)
    cfg.finetune.freeze = "conv3"
    t = make()
    net = t.model.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(2):
        t.step()
    after = net.state_dict()
    frozen = ("conv1.", "conv2.", "conv3.")  # weights, BatchNorm scale/shift and running statistics
    changed = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert not {k for k in changed if k.startswith(frozen)}
    assert {k for k in changed if k.startswith("inception3a.")} and "fc.weight" in changed
    assert all(not p.requires_grad for n, p in net.named_parameters() if n.startswith(frozen))
    grouped = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}


def test_freezing_an_unknown_layer_names_the_choices(tmp_path):
    make, cfg = tiny(tmp_path)
    cfg.finetune.freeze = "conv9"
    with pytest.raises(ValueError, match="finetune.freeze .*conv1.*'conv9'"):
        make()


def test_the_step_benchmark_times_each_part_of_a_real_step():
    from features.finetune_benchmark import PARTS, finetune_settings, synthetic_windows, timed_step

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    windows = synthetic_windows(3, 20, 80, 60)
    assert windows.boxes[:, 2:].max() <= 80 and (windows.labels > 0).any() and (windows.labels == 0).any()
    cfg, fcfg = finetune_settings(32, 2, freeze="conv3")
    cfg.batch_size, cfg.fg_per_batch = 8, 2
    torch.manual_seed(0)
    t = FineTuner(build_googlenet("none")[0], 3, windows, lambda k: images[k], cfg, fcfg)
    before = t.model.net.fc.weight.clone()
    parts = timed_step(t)
    assert set(parts) == set(PARTS) and all(v > 0 for v in parts.values())
    assert not torch.equal(before, t.model.net.fc.weight)  # the optimiser's step happened


def _hardest_on_a_rank(tmp_path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # from torchrun's variables, which run_ranks sets
    try:
        make, cfg = tiny(tmp_path)
        cfg.finetune.bg_candidates = 3
        t = make()
        idx = t.sample(3)
        np.save(out / f"{dist.get_rank()}.npy", idx[t.hardest_background(idx, np.zeros(len(idx), bool))])
    finally:
        dist.destroy_process_group()


def test_the_dataset_benchmark_steps_on_decoded_images_with_each_cache(tmp_path):
    from features.finetune_benchmark import dataset_steps

    from .fakes import write_voc

    root = write_voc(tmp_path / "voc", {f"im{k}": [("sign", 4, 4, 30, 30)] for k in range(5)},
                     {"train": [f"im{k}" for k in range(5)], "test": ["im0"]}, width=96, height=64)  # fmt: skip
    times = dataset_steps(["dataset=voc", f"dataset.root={root}", "dataset.train_split=train"], [1, 64], 32, steps=2,
                          rounds=1, warmup=1, weights="none")  # fmt: skip
    assert list(times) == [1, 64] and all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_under_torchrun_every_rank_keeps_the_hardest_background_of_one_process(tmp_path):
    """Two ranks score a half of the candidates each, then all of them hold every score: both keep the same
    windows, the ones one process keeps."""
    from .ranks import run_ranks

    assert run_ranks(_hardest_on_a_rank, tmp_path, tmp_path) == [0, 0]
    make, cfg = tiny(tmp_path)
    cfg.finetune.bg_candidates = 3
    t = make()
    idx = t.sample(3)
    alone = idx[t.hardest_background(idx, np.zeros(len(idx), bool))]
    assert np.load(tmp_path / "0.npy").tolist() == np.load(tmp_path / "1.npy").tolist() == alone.tolist()
