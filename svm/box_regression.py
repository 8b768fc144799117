"""R-CNN's class-specific bounding-box regression: ridge regression from a proposal's feature to the
offsets that move it onto its ground-truth box.

Targets (``rcnn.boxes.encode``) (continuous xyxy boxes, centres and sizes): ``dx = (gx - px) / pw``, ``dy = (gy - py) / ph``,
``dw = log(gw / pw)``, ``dh = log(gh / ph)``; centred and whitened per class (as R-CNN's
``rcnn_train_bbox_regressor.m``), then one ridge fit (scikit-learn) per class. The fitted model is folded
back to raw targets: ``t = x @ W + b``.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge

from rcnn.boxes import decode, encode  # the box coder (the ground: detection decodes with it too)

__all__ = ["encode", "decode", "Whitening", "fit_regressor"]


class Whitening:
    """Centre and whiten targets: ``(t - mean) @ inverse_sqrt(cov)``, and back."""

    def __init__(self, targets: np.ndarray, eps: float = 1e-6):
        t = np.asarray(targets, np.float64)
        self.mean = t.mean(axis=0)
        cov = np.cov(t, rowvar=False) if len(t) > 1 else np.eye(t.shape[1])
        vals, vecs = np.linalg.eigh(np.atleast_2d(cov))
        vals = np.maximum(vals, 0) + eps
        self.forward = vecs @ np.diag(vals**-0.5) @ vecs.T  # whitens
        self.inverse = vecs @ np.diag(vals**0.5) @ vecs.T  # un-whitens

    def __call__(self, targets: np.ndarray) -> np.ndarray:
        return (np.asarray(targets, np.float64) - self.mean) @ self.forward

    def undo(self, whitened: np.ndarray) -> np.ndarray:
        return np.asarray(whitened, np.float64) @ self.inverse + self.mean


def fit_regressor(X: np.ndarray, targets: np.ndarray, lam: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression on whitened targets, folded back: ``(W [D, 4], b [4])`` with ``targets ~ X @ W + b``."""
    white = Whitening(targets)
    ridge = Ridge(alpha=lam, fit_intercept=True, solver="auto")
    ridge.fit(np.asarray(X, np.float64), white(targets))
    W = ridge.coef_.T @ white.inverse  # [D, 4]
    b = ridge.intercept_ @ white.inverse + white.mean
    return W.astype(np.float32), b.astype(np.float32)
