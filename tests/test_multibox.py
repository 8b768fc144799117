import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from features.backbone import build_googlenet, resolve_weights
from proposals.multibox import (
    MultiBoxNet,
    cluster_priors,
    export_model,
    heldout_recall,
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


def patient_cfg(epochs, patience):
    c = cfg(epochs)
    c.patience, c.top_k = patience, 4
    return c


def scripted_recall(monkeypatch, values):
    """heldout_recall returns ``values`` in turn (one per epoch); the calls are counted."""
    calls = []

    def fake(model, images, gts, top_k):
        calls.append(top_k)
        return values[len(calls) - 1]

    monkeypatch.setattr("proposals.multibox.heldout_recall", fake)
    return calls


def test_training_stops_when_heldout_recall_stops_rising(tmp_path, monkeypatch):
    images, gts, priors = tiny_problem()
    weights = resolve_weights("none")
    calls = scripted_recall(monkeypatch, [0.2, 0.5, 0.5, 0.4, 0.9, 0.9])
    epochs = []  # each epoch's weights, read back from the checkpoint written before on_epoch
    model, state = train_multibox(images[:6], gts[:6], priors, patient_cfg(6, 2), weights, tmp_path / "a.pt",
                                  progress=False, heldout=(images[6:], gts[6:]),
                                  on_epoch=lambda s: epochs.append(torch.load(tmp_path / "a.pt", weights_only=False)["model"]))  # fmt: skip
    # Epoch 2 is the best (0.5); epochs 3 and 4 do not rise above it: stopped after 4, epoch 2's weights kept.
    assert state.epoch == 4 and len(calls) == 4 and calls[0] == 4
    assert (state.best_epoch, state.best_recall) == (2, 0.5)
    assert [h["recall_50"] for h in state.history] == [0.2, 0.5, 0.5, 0.4]
    ck = torch.load(tmp_path / "a.pt", weights_only=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, epochs[1][k])
        torch.testing.assert_close(v, ck["best_model"][k])
    assert any(not torch.equal(v, ck["model"][k]) for k, v in ck["best_model"].items())  # epoch 4 moved on
    exported = torch.load(export_model(tmp_path / "a.pt", tmp_path / "model.pt"), weights_only=False)
    assert "best_model" not in exported and "optimizer" not in exported
    for k, v in exported["model"].items():
        torch.testing.assert_close(v, ck["best_model"][k])


def test_patience_is_ignored_without_heldout_images(tmp_path, monkeypatch):
    images, gts, priors = tiny_problem()
    calls = scripted_recall(monkeypatch, [0.0] * 3)
    _, state = train_multibox(images, gts, priors, patient_cfg(3, 1), resolve_weights("none"), tmp_path / "a.pt",
                              progress=False)  # fmt: skip
    assert state.epoch == 3 and calls == [] and "recall_50" not in state.history[0]


def test_stopped_training_resumes_to_the_same_stop(tmp_path, monkeypatch):
    images, gts, priors = tiny_problem()
    weights = resolve_weights("none")
    values = [0.3, 0.6, 0.5, 0.5, 0.7]
    scripted_recall(monkeypatch, values)
    straight, s_state = train_multibox(images[:6], gts[:6], priors, patient_cfg(5, 2), weights, tmp_path / "a.pt",
                                       progress=False, heldout=(images[6:], gts[6:]))  # fmt: skip

    def kill_after_third_epoch(state):
        if state.epoch == 3:
            raise KeyboardInterrupt

    scripted_recall(monkeypatch, values)
    with pytest.raises(KeyboardInterrupt):
        train_multibox(images[:6], gts[:6], priors, patient_cfg(5, 2), weights, tmp_path / "b.pt", progress=False,
                       heldout=(images[6:], gts[6:]), on_epoch=kill_after_third_epoch)  # fmt: skip
    scripted_recall(monkeypatch, values[3:])
    resumed, r_state = train_multibox(images[:6], gts[:6], priors, patient_cfg(5, 2), weights, tmp_path / "b.pt",
                                      progress=False, heldout=(images[6:], gts[6:]))  # fmt: skip
    assert s_state.epoch == r_state.epoch == 4 and r_state.epochs_before == 3
    assert (r_state.best_epoch, r_state.best_recall) == (s_state.best_epoch, s_state.best_recall) == (2, 0.6)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_heldout_recall_against_a_loop(monkeypatch):
    rng = np.random.default_rng(1)
    k = 5
    corner = rng.uniform(0, 0.6, (3, 7, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.1, 0.4, (3, 7, 2))], axis=2).astype(np.float32)
    scores = rng.uniform(0, 1, (3, 7)).astype(np.float32)
    gts = [boxes[0, :2] + 0.01, np.zeros((0, 4), np.float32), np.concatenate([boxes[2, :3], [[0.0, 0.0, 0.05, 0.05]]])]
    monkeypatch.setattr("proposals.multibox.predict", lambda model, images: (boxes, scores))

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    found = total = 0
    for b, s, g in zip(boxes, scores, gts):
        top = [b[j] for j in sorted(range(len(s)), key=lambda j: -s[j])[:k]]
        for box in g:
            total += 1
            found += any(iou(box, t) >= 0.5 for t in top)
    assert 0 < found < total
    assert heldout_recall(torch.nn.Identity(), np.zeros((3, 8, 8, 3), np.uint8), gts, k) == pytest.approx(found / total)


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
