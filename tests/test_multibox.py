import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from features.backbone import build_googlenet, resolve_weights
from proposals.multibox import (
    MultiBoxNet,
    cluster_priors,
    hungarian_match,
    multibox_loss,
    predict,
    train_multibox,
)
from proposals.stage import SOURCE_MULTIBOX, SOURCE_SS, combine


def brute_match(boxes, logits, gt, alpha):
    """The minimum-cost assignment by enumerating every injective map from ground truth to predictions."""
    best, best_cost = None, np.inf
    for preds in itertools.permutations(range(len(boxes)), len(gt)):
        cost = sum(alpha * 0.5 * ((boxes[p] - gt[j]) ** 2).sum() - logits[p] for j, p in enumerate(preds))
        if cost < best_cost:
            best, best_cost = preds, cost
    return best, best_cost


def test_hungarian_matching_hand_case():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]])
    gt = torch.tensor([[0.5, 0.5, 1.0, 0.9], [0.0, 0.0, 0.4, 0.5]])
    rows, cols = hungarian_match(boxes, torch.zeros(3), gt, alpha=1.0)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}
    # A confident prediction wins a tie-ish match: the objective includes -logit.
    rows, cols = hungarian_match(boxes, torch.tensor([0.0, 0.0, 50.0]), gt[:1], alpha=1.0)
    assert rows.tolist() == [2]
    assert hungarian_match(boxes, torch.zeros(3), torch.zeros((0, 4)), 1.0)[0].size == 0


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matching_is_optimal(seed):
    rng = np.random.default_rng(seed)
    boxes, logits, gt = rng.random((6, 4)), rng.normal(size=6), rng.random((3, 4))
    rows, cols = hungarian_match(torch.tensor(boxes), torch.tensor(logits), torch.tensor(gt), alpha=0.3)
    cost = sum(0.3 * 0.5 * ((boxes[r] - gt[c]) ** 2).sum() - logits[r] for r, c in zip(rows, cols))
    _, best_cost = brute_match(boxes, logits, gt, 0.3)
    assert cost == pytest.approx(best_cost)


def test_loss_by_hand():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    logits = torch.tensor([[2.0, -1.0]])
    gt = [torch.tensor([[0.0, 0.0, 0.6, 0.5]])]
    loss, loc, conf = multibox_loss(boxes, logits, gt, alpha=0.3)
    want_loc = 0.5 * 0.1**2  # prediction 0 matched
    want_conf = np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))  # BCE(2, 1) + BCE(-1, 0)
    assert loc.item() == pytest.approx(want_loc) and conf.item() == pytest.approx(want_conf, rel=1e-6)
    assert loss.item() == pytest.approx(0.3 * want_loc + want_conf, rel=1e-6)


def test_prior_clustering_finds_the_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.4, 1.0]])
    boxes = np.concatenate([c + rng.normal(0, 0.01, (50, 4)) for c in centres])
    priors = cluster_priors(boxes, 3)
    for c in centres:
        assert np.abs(priors - c).max(axis=1).min() < 0.02
    few = cluster_priors(centres, 10)  # fewer distinct boxes than priors: each box is a prior
    assert len(few) == 3


def test_network_starts_at_the_priors():
    priors = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]])
    model = MultiBoxNet(build_googlenet("none")[0], priors, positives_per_image=1).eval()
    boxes, logits = model(torch.randn(2, 3, 64, 64))
    assert boxes.shape == (2, 2, 4) and logits.shape == (2, 2)
    assert (boxes - priors).abs().max() < 0.05
    assert torch.sigmoid(logits).mean().item() == pytest.approx(0.5, abs=0.05)


def tiny_problem(n=8, size=64):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    base = np.array([[0.1, 0.2, 0.5, 0.7], [0.4, 0.4, 0.9, 0.95]], np.float32)
    gts = [(base + rng.uniform(-0.05, 0.05, (2, 4))).astype(np.float32)[: 1 + i % 2] for i in range(n)]
    priors = cluster_priors(np.concatenate(gts), 4)
    return images, gts, priors


def cfg(epochs):
    return OmegaConf.create(dict(epochs=epochs, batch_size=4, lr=1e-3, weight_decay=0.0, alpha=0.3, flip=True))


def test_training_resumes_exactly_where_it_stopped(tmp_path):
    images, gts, priors = tiny_problem()
    weights = resolve_weights("none")
    straight, s_state = train_multibox(images, gts, priors, cfg(3), weights, tmp_path / "a.pt", progress=False)

    def kill_after_first_epoch(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_multibox(images, gts, priors, cfg(3), weights, tmp_path / "b.pt", progress=False, on_epoch=kill_after_first_epoch)
    resumed, r_state = train_multibox(images, gts, priors, cfg(3), weights, tmp_path / "b.pt", progress=False)
    assert [h["epoch"] for h in r_state.history] == [1, 2, 3]
    assert r_state.epochs_before == 1 and r_state.seconds > 0  # the killed run's epoch counted in the time
    assert s_state.epochs_before == 0
    np.testing.assert_allclose([h["loss"] for h in r_state.history], [h["loss"] for h in s_state.history], rtol=1e-5)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    boxes, scores = predict(resumed, images[:3])
    assert boxes.shape == (3, 4, 4) and scores.shape == (3, 4) and 0 <= boxes.min() and boxes.max() <= 1


def test_combine_merges_duplicates():
    ss = np.array([[0, 0, 10, 10], [50, 50, 90, 90], [20, 20, 40, 40]], np.float32)
    mb = np.array([[0, 0, 10, 10.5], [51, 50, 90, 90], [0, 0, 10, 10.2], [100, 0, 120, 20]], np.float32)
    out = combine(ss, mb, [0.9, 0.8, 0.7, 0.6], merge_iou=0.9)
    # MultiBox's third box duplicates its first; selective search's first two duplicate MultiBox's.
    np.testing.assert_array_equal(out["boxes"], [mb[0], mb[1], mb[3], ss[2]])
    assert out["source"].tolist() == [SOURCE_MULTIBOX] * 3 + [SOURCE_SS]
    np.testing.assert_allclose(out["scores"], [0.9, 0.8, 0.6, -1])
    assert combine(ss, np.zeros((0, 4)), [], 0.9)["boxes"].shape == (3, 4)


def test_torchrun_trains_multibox_as_one_process(tmp_path, one_thread):
    """Two ranks (torchrun's variables, gloo): each rank computes part of every batch (3 images: 2 + 1, the last
    batch 1 + 1), with the whole batch's BatchNorm statistics and flips: one process's training.

    Measured: the first epoch's mean loss (3 Adam steps) agrees to 1e-4 (with per-rank BatchNorm 2.5% off);
    Adam's steps follow the gradients' signs, so float rounding (PyTorch's fp32 BatchNorm backward is ~1%
    from fp64 on this tiny network) grows faster than under SGD: the tolerance is 1e-3."""
    import json

    from rcnn.run import main

    from .ranks import run_ranks

    args = ["progress=false", f"dataset.root={tmp_path / 'demo'}", "dataset.train_images=8",
            "dataset.test_images=2", "dataset.width=128", "dataset.height=96", "dataset.min_size=24", "dataset.max_size=60",
            "multibox.input_size=64", "multibox.num_priors=6", "multibox.top_k=5", "multibox.epochs=2",
            "multibox.batch_size=3", "backbone.weights=none", "workers=1", "stage=multibox"]  # fmt: skip
    runs = ("one", "two")
    assert main(args + [f"out={tmp_path / 'one'}"]) == 0  # here, on one thread
    assert run_ranks(main, args + [f"out={tmp_path / 'two'}"]) == [0, 0]
    m = [json.loads((tmp_path / name / "multibox" / "metrics.json").read_text()) for name in runs]
    assert m[0]["key"] == m[1]["key"] and m[1]["epochs"] == 2
    first = [x["history"][0]["loss"] for x in m]
    assert first[1] == pytest.approx(first[0], rel=1e-3)
    assert m[1]["history"][1]["loss"] == pytest.approx(m[0]["history"][1]["loss"], rel=1e-2)
    saved = torch.load(tmp_path / "two" / "multibox" / m[1]["key"] / "model.pt", weights_only=False)
    assert saved["epoch"] == 2 and "optimizer" not in saved
