import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from features.backbone import NORMALIZATION_IMAGENET, build_googlenet, resolve_weights
from features.pretrain import Pretrainer, lr_factor, topk_correct, training_loss
from features.pretrain_data import ClassificationTree, crop_specs, scheme_crops
from rcnn.config import ConfigError, load_config
from rcnn.run import main


def write_tree(root, per_class=12, size=48, seed=0, classes=("blue", "red")):
    """A 2-class tree: noisy images whose dominant colour is their class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
                img[..., 2 if c == 0 else 0] += 150  # blue or red
                Image.fromarray(img).save(folder / f"{k:03d}.png")
    return root


def tiny_args(root, out, *extra):
    return [
        "stage=pretrain", f"pretrain.data={root}", f"out={out}", "progress=false", "pretrain.input_size=32",
        "pretrain.batch_size=8", "pretrain.precision=fp32", "pretrain.bn_batches=2", "pretrain.test_limit=4",
        "pretrain.eval_every=0", "pretrain.lr=0.05", "pretrain.schedule=cosine", "pretrain.ema_decay=0.9", *extra,
    ]  # fmt: skip


class Outputs:
    def __init__(self, logits, aux_logits2, aux_logits1):
        self.logits, self.aux_logits2, self.aux_logits1 = logits, aux_logits2, aux_logits1


def test_training_loss_weights_both_auxiliary_heads():
    g = torch.Generator().manual_seed(0)
    main_, a1, a2 = (torch.randn(5, 4, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 3, 0])
    total, main_loss = training_loss(Outputs(main_, a2, a1), y, aux_weight=0.3)
    want = F.cross_entropy(main_, y) + 0.3 * F.cross_entropy(a1, y) + 0.3 * F.cross_entropy(a2, y)
    torch.testing.assert_close(total, want)
    torch.testing.assert_close(main_loss, F.cross_entropy(main_, y))
    assert training_loss(Outputs(main_, a2, a1), y, aux_weight=0.0)[0].item() == pytest.approx(main_loss.item())


@pytest.mark.parametrize("seed", range(3))
def test_topk_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    probs = torch.from_numpy(rng.random((50, 7)))
    labels = torch.from_numpy(rng.integers(0, 7, 50))
    got = topk_correct(probs, labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        want = sum(int(labels[i]) in np.argsort(-probs[i].numpy())[:k].tolist() for i in range(50))
        assert got[k] == want
    assert topk_correct(probs[:, :2], labels.clamp(max=1), ks=(1, 5))[5] == 50  # k beyond the classes


def test_144_crops_by_hand():
    # A 100 x 200 (h x w) image, a 32 px network: shorter sides 256/288/320/352 x 32/224 = 37, 41, 46, 50.
    specs = crop_specs("144crop", 100, 200, 32)
    assert len(specs) == 144 and sum(s.flip for s in specs) == 72
    assert sorted({(s.height, s.width) for s in specs}) == [(37, 74), (41, 82), (46, 92), (50, 100)]
    first = [s.box for s in specs[:12]]  # scale 37: the left square, unmirrored then mirrored
    corners_and_centre = [(0, 0, 32, 32), (5, 0, 37, 32), (0, 5, 32, 37), (5, 5, 37, 37), (2, 2, 34, 34)]
    assert first[:6] == corners_and_centre + [(0, 0, 37, 37)] and first[6:] == first[:6]
    assert [s.flip for s in specs[:12]] == [False] * 6 + [True] * 6
    centre_square = specs[12].box  # the centre square starts at (74 - 37) // 2 = 18
    assert centre_square == (18, 0, 50, 32) and specs[17].box == (18, 0, 55, 37)
    assert specs[24].box == (37, 0, 69, 32)  # the right square
    # A portrait image takes top/centre/bottom squares.
    portrait = crop_specs("144crop", 200, 100, 32)
    assert portrait[12].box == (0, 18, 32, 50)
    # Ten crops: four corners and the centre of the image resized to 32 / 0.875 = 37 on its shorter side.
    ten = crop_specs("10crop", 100, 200, 32)
    assert [s.box for s in ten[:5]] == [(0, 0, 32, 32), (42, 0, 74, 32), (0, 5, 32, 37), (42, 5, 74, 37), (21, 2, 53, 34)]
    assert crop_specs("center", 100, 200, 32)[0].box == (21, 2, 53, 34)


def test_test_crops_shapes_and_mirrors():
    img = torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)
    for scheme, k in (("center", 1), ("10crop", 10), ("144crop", 144)):
        crops = scheme_crops(img, scheme, 32)
        assert crops.shape == (k, 3, 32, 32) and crops.dtype == torch.uint8
    ten = scheme_crops(img, "10crop", 32)
    torch.testing.assert_close(ten[5:], ten[:5].flip(-1))


def test_schedules():
    assert lr_factor("step", 0, 100, 10, 0, 0.96, 8) == 1.0
    assert lr_factor("step", 79, 1000, 10, 0, 0.96, 8) == 1.0 and lr_factor("step", 80, 1000, 10, 0, 0.96, 8) == 0.96
    assert lr_factor("step", 160, 1000, 10, 0, 0.96, 8) == pytest.approx(0.96**2)
    assert lr_factor("cosine", 9, 110, 10, 10, 0, 0) == 1.0 and lr_factor("cosine", 0, 110, 10, 10, 0, 0) == 0.1
    assert lr_factor("cosine", 60, 110, 10, 10, 0, 0) == pytest.approx(0.5)
    assert lr_factor("onecycle", 0, 110, 10, 10, 0, 0) == pytest.approx(1 / 25 + (1 - 1 / 25) / 10)
    assert lr_factor("onecycle", 110, 110, 10, 10, 0, 0) == pytest.approx(0.0)


def test_a_few_steps_learn_a_two_class_tree(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=16)
    out = tmp_path / "run"
    assert main(tiny_args(root, out, "pretrain.epochs=6", "pretrain.test_schemes=[center,10crop,144crop]")) == 0
    m = json.loads((out / "pretrain" / "metrics.json").read_text())
    assert m["epochs"] == 6 and m["steps"] == 6 * 4 and m["classes"] == 2
    assert m["top1_center"] >= 0.8, m  # chance is 0.5
    assert m["top5_center"] == 1.0 and 0 <= m["top1_10crop"] <= 1 and 0 <= m["top1_144crop"] <= 1
    assert m["test_images"]["144crop"] == 4 and m["test_images"]["center"] == 16
    assert m["images_per_second"] > 0 and m["seconds"] > 0 and m["gemm_gflops"]["fp32"] > 0
    assert (out / "pretrain" / "loss.png").stat().st_size > 0
    # The model is a backbone for every stage, with its normalisation and classes.
    saved = torch.load(out / "pretrain" / "model.pt", weights_only=True)
    assert saved["normalization"] == NORMALIZATION_IMAGENET and saved["classes"] == ["blue", "red"]
    assert not any(k.startswith("aux") for k in saved["backbone"])
    net, loaded = build_googlenet(str(out / "pretrain" / "model.pt"))
    assert loaded.kind == "file" and loaded.normalization == NORMALIZATION_IMAGENET and not net.transform_input
    assert resolve_weights(str(out / "pretrain" / "model.pt")).describe()["normalization"] == "imagenet"
    # A second run finds it complete.
    assert main(tiny_args(root, out, "pretrain.epochs=6", "pretrain.test_schemes=[center,10crop,144crop]")) == 0
    # Another test size is not another model: the cached one is tested again, not trained again.
    assert main(tiny_args(root, out, "pretrain.epochs=6", "pretrain.test_schemes=[center]", "pretrain.test_size=40")) == 0
    again = json.loads((out / "pretrain" / "metrics.json").read_text())
    assert again["test_size"] == 40 and m["test_size"] == 32 and again["key"] == m["key"]
    assert again["steps"] == m["steps"] and again["history"] == m["history"]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree", per_class=8)
    common = ["pretrain.epochs=2", "pretrain.checkpoint_every=1", "pretrain.test_schemes=[center]"]
    assert main(tiny_args(root, tmp_path / "a", *common)) == 0

    real_step, calls = Pretrainer.train_step, []

    def dies_at_step_3(self, *args):
        calls.append(self.step)
        if len(calls) == 3:  # mid-epoch: epoch 1 has 2 steps of 8 images
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(Pretrainer, "train_step", dies_at_step_3)
    assert main(tiny_args(root, tmp_path / "b", *common)) == 130
    monkeypatch.setattr(Pretrainer, "train_step", real_step)
    assert main(tiny_args(root, tmp_path / "b", *common)) == 0
    a = torch.load(tmp_path / "a" / "pretrain" / "model.pt", weights_only=True)["backbone"]
    b = torch.load(tmp_path / "b" / "pretrain" / "model.pt", weights_only=True)["backbone"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ma = json.loads((tmp_path / "a" / "pretrain" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "pretrain" / "metrics.json").read_text())
    assert [h["loss"] for h in ma["history"]] == pytest.approx([h["loss"] for h in mb["history"]], rel=1e-5)


def test_bad_images_are_skipped_named_and_counted(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=8)
    (root / "train" / "red" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "run"
    assert main(tiny_args(root, out, "pretrain.epochs=1", "pretrain.test_schemes=[center]", "pretrain.cache_images=false")) == 0
    m = json.loads((out / "pretrain" / "metrics.json").read_text())
    assert m["bad_images"] >= 1 and any("broken.png" in b for b in m["bad_image_list"])


def test_a_missing_tree_is_a_clear_error(tmp_path, capsys):
    assert main(["stage=pretrain", f"pretrain.data={tmp_path / 'nowhere'}", f"out={tmp_path / 'o'}"]) == 1
    assert "nowhere/train: no such folder" in capsys.readouterr().err
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        ClassificationTree(tmp_path / "empty", "train")


def test_presets_carry_their_recipe_and_the_command_line_wins():
    cfg = load_config(["pretrain.data=imagenette"])
    assert cfg.pretrain.input_size == 112 and cfg.pretrain.schedule.value == "onecycle" and cfg.pretrain.ema_decay is None
    assert cfg.pretrain.test_size == 128
    assert load_config(["pretrain.data=imagenette", "pretrain.epochs=3"]).pretrain.epochs == 3
    plain = load_config(["pretrain.data=/some/tree"]).pretrain
    assert plain.input_size == 224 and plain.schedule.value == "step" and plain.lr_decay == 0.96
    with pytest.raises(ConfigError, match="pretrain.crop_scale"):
        load_config(["pretrain.crop_scale=[0.5,0.1]"])
    with pytest.raises(ConfigError, match="pretrain.interpolations"):
        load_config(["pretrain.interpolations=[lanczos]"])
    with pytest.raises(ConfigError, match="pretrain.test_size"):
        load_config(["pretrain.test_size=8"])


def _update_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start| over every trained tensor (L2): how far two runs' updates differ."""
    keys = [k for k in start if start[k].is_floating_point() and "running" not in k]
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys)
    return float((num / sum(((a[k] - start[k]).double() ** 2).sum() for k in keys)).sqrt())


def test_torchrun_pretrains_as_one_process(tmp_path, one_thread):
    """Two ranks (torchrun's variables, gloo): each rank loads half of every batch, BatchNorm takes the whole
    batch's statistics (CpuSyncBatchNorm), dropout the whole batch's masks: one process's steps, in parts.

    Tolerances, measured: the first step's loss agrees to 1e-6, the second's to 6e-5 (with per-rank
    BatchNorm the first is 8% off). The weights' update after two steps differs by ~2% (L2, relative;
    per-rank BatchNorm: over 100%): PyTorch's own fp32 BatchNorm backward on CPU is that far from fp64 on this
    tiny network (1 x 1 maps at inception5 on 32 px crops, 16 values a channel: 1.3% on its worst gradient,
    against CpuSyncBatchNorm's 3e-5), and the second step starts from the first's slightly different
    weights. At a higher rate a random network amplifies that (lr 0.01: 20% after two steps), so the test
    trains slowly."""
    from features.pretrain import pretrain_googlenet

    from .ranks import run_ranks

    root = write_tree(tmp_path / "tree", per_class=8)  # 16 images: 1 step an epoch
    extra = ["pretrain.epochs=2", "pretrain.batch_size=16", "pretrain.warmup_epochs=0", "pretrain.lr=0.0001", "pretrain.test_schemes=[center]"]
    args = tiny_args(root, "{out}", *extra)
    runs = ("one", "two")
    assert main([a.replace("{out}", str(tmp_path / "one")) for a in args]) == 0  # here, on one thread
    assert run_ranks(main, [a.replace("{out}", str(tmp_path / "two")) for a in args]) == [0, 0]
    ck = {name: torch.load(tmp_path / name / "pretrain" / json.loads((tmp_path / name / "pretrain" / "metrics.json")
                           .read_text())["key"] / "checkpoint.pt", weights_only=False) for name in runs}  # fmt: skip
    assert ck["one"]["step"] == ck["two"]["step"] == 2
    losses = [[h["loss"] for h in ck[name]["history"]] for name in runs]
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)  # the first step: the same forward pass
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-3)
    start = pretrain_googlenet(2).state_dict()
    assert _update_difference(ck["two"]["model"], ck["one"]["model"], start) < 0.05
    ema = [{k.removeprefix("module."): v for k, v in ck[name]["ema"].items() if k != "n_averaged"} for name in runs]
    assert _update_difference(ema[1], ema[0], start) < 0.05
    # The model: the averaged weights, BatchNorm recomputed on both ranks' crops (the whole batches').
    models = [torch.load(tmp_path / name / "pretrain" / "model.pt", weights_only=True)["backbone"] for name in runs]
    for k, a in models[0].items():
        if "running" in k:
            torch.testing.assert_close(models[1][k], a, rtol=0.02, atol=1e-3, msg=k)
    metrics = [json.loads((tmp_path / name / "pretrain" / "metrics.json").read_text()) for name in runs]
    assert metrics[1]["steps"] == 2 and metrics[1]["test_images"] == metrics[0]["test_images"]
