"""The training loops' shared divergence check: a loss that is no longer finite stops the run, naming
where, what to lower and the checkpoint kept."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from features.backbone import resolve_weights
from proposals.multibox import cluster_priors, train_multibox
from rcnn.training import check_loss


def test_check_loss_passes_finite_and_stops_otherwise(tmp_path):
    check_loss(3.2, "fine-tuning", "iteration 4", "finetune.lr", 0.01, tmp_path / "ck.pt")
    for bad in (math.nan, math.inf):
        with pytest.raises(
            FloatingPointError,
            match=r"fine-tuning diverged at iteration 4 \(loss (nan|inf)\); lower finetune.lr \(now 0.01\)",
        ):
            check_loss(bad, "fine-tuning", "iteration 4", "finetune.lr", 0.01, tmp_path / "ck.pt")


def test_multibox_stops_with_a_clear_error_when_it_diverges(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    gts = [np.array([[0.1, 0.2, 0.6, 0.8]], np.float32), np.array([[0.3, 0.3, 0.9, 0.9]], np.float32)] * 2
    priors = cluster_priors(np.concatenate(gts), 2)
    cfg = OmegaConf.create(dict(epochs=4, batch_size=2, lr=1e12, weight_decay=0.0, alpha=0.3, flip=False))
    # (before the shared check: a ValueError from the matcher, "matrix contains invalid numeric entries")
    with pytest.raises(FloatingPointError, match="MultiBox training diverged at epoch .*multibox.lr"):
        train_multibox(images, gts, priors, cfg, resolve_weights("none"), tmp_path / "ck.pt", progress=False)
