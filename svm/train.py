"""R-CNN's per-class linear SVMs, trained with hard-negative mining in one pass over the images.

The miner sees one image at a time (its proposals' features and their IoU with each class's boxes) and
keeps, per class, only a cache of hard negatives; positives (ground-truth features) are given up front.
Beyond R-CNN, ``max_negatives`` bounds each class's cache after every retrain (the lowest-scoring, i.e.
easiest, negatives go first), so that a class whose SVM evicts nothing (a degenerate fit) cannot grow
its cache, and its fits' time, without end.
As in R-CNN's ``rcnn_train.m``: the first image's negatives train the first model; afterwards a class
adds the negatives its current model scores above ``hard_threshold``, retrains once more than
``retrain_limit`` new ones were added (and after the last image), and after each retrain drops cached
negatives scoring below ``evict_threshold``. A class starts from ``w = 0, b = 0``, which scores every
negative 0, so its first image's negatives all count as hard: the same as R-CNN's first pass.

Classes are independent given the image stream, so the fits due after one image run in ``workers``
processes at once when they are big enough to pay for starting them (liblinear is single-threaded, and
its random generator is global to a process, so threads would not do); the result is the same for any
number of workers.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

__all__ = ["SvmParams", "HardNegativeMiner", "fit_svm", "objective", "mean_norm_scale"]

log = logging.getLogger("svm")

# Fits go to worker processes only when the classes due hold more negatives than this in all: starting
# the processes costs about 2 s, more than a few small fits (the demo's first image: 5 x ~2k) take.
PARALLEL_MIN_NEGATIVES = 20_000


@dataclass(frozen=True)
class SvmParams:
    C: float = 0.001
    bias_multiplier: float = 10.0
    pos_weight: float = 2.0
    neg_iou: float = 0.3
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_limit: int = 2000
    max_negatives: int | None = None  # per class, after a retrain; the lowest-scoring go first
    max_iter: int = 10000
    seed: int = 0

    @classmethod
    def from_config(cls, c, seed: int = 0) -> "SvmParams":
        names = cls.__dataclass_fields__.keys() - {"seed"}
        return cls(**{k: c[k] for k in names}, seed=seed)


def fit_svm(pos: np.ndarray, neg: np.ndarray, p: SvmParams) -> tuple[np.ndarray, float]:
    """One LinearSVC on positives (+1) and negatives (-1): ``(w [D], b)``."""
    return _fit(pos, neg, p)[:2]


def _fit(pos: np.ndarray, neg: np.ndarray, p: SvmParams) -> tuple[np.ndarray, float, bool]:
    """``fit_svm`` and whether liblinear converged within ``max_iter`` (its warning, one per fit, is
    counted instead: the miner's history keeps it and the stage reports the total once)."""
    X = np.concatenate([pos, neg]).astype(np.float64, copy=False)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    svc = LinearSVC(
        C=p.C, loss="hinge", dual=True, class_weight={1: p.pos_weight, -1: 1.0},
        intercept_scaling=p.bias_multiplier, max_iter=p.max_iter, random_state=p.seed,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svc.coef_[0].astype(np.float32), float(svc.intercept_[0]), converged


def objective(w: np.ndarray, b: float, pos: np.ndarray, neg: np.ndarray, p: SvmParams) -> dict:
    """The primal objective liblinear minimises, in its pieces: 0.5 (|w|^2 + (b / bias_multiplier)^2)
    + C pos_weight sum(hinge of positives) + C sum(hinge of negatives)."""
    zp = pos @ w + b
    zn = neg @ w + b
    reg = 0.5 * (float(w @ w) + (b / p.bias_multiplier) ** 2)
    loss_pos = p.C * p.pos_weight * float(np.maximum(0, 1 - zp).sum())
    loss_neg = p.C * float(np.maximum(0, 1 + zn).sum())
    return {"total": reg + loss_pos + loss_neg, "reg": reg, "loss_pos": loss_pos, "loss_neg": loss_neg}


@dataclass
class _ClassCache:
    pos: np.ndarray  # [P, D] float32 positives
    neg: list[np.ndarray] = field(default_factory=list)  # float32 blocks of cached negatives
    w: np.ndarray | None = None
    b: float = 0.0
    added: int = 0  # negatives added since the last retrain
    retrains: int = 0
    capped: int = 0  # hard negatives dropped by the max_negatives bound, in all

    def negatives(self) -> np.ndarray:
        return np.concatenate(self.neg) if self.neg else np.zeros((0, self.pos.shape[1]), np.float32)


class HardNegativeMiner:
    """Per-class SVMs trained by hard-negative mining; feed it :meth:`add_image` in order, then :meth:`finish`.

    Args:
        positives: per class, the (scaled) features of its ground-truth boxes, ``[P_c, D]``. A class
            without positives gets no model (``trained`` False, scores ``-inf``).
        params: the SVM and mining settings.
        workers: processes fitting classes at once (1: in this process). Call :meth:`close` when done.
    """

    def __init__(self, positives: list[np.ndarray], params: SvmParams, workers: int = 1):
        self.p = params
        self.dim = next((len(x[0]) for x in positives if len(x)), 0)
        self.classes = [_ClassCache(np.asarray(x, np.float32)) for x in positives]
        self.history: list[dict] = []  # one record per retrain: class, image, objective pieces, cache size
        self.images_seen = 0
        self.workers = workers
        self.parallel_min_negatives = PARALLEL_MIN_NEGATIVES
        self._pool = None

    def __getstate__(self) -> dict:  # a checkpoint keeps the mining state, not the worker processes
        return {**self.__dict__, "_pool": None}

    def close(self) -> None:
        """Stop the worker processes (a later fit starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @property
    def trained(self) -> np.ndarray:
        return np.array([c.w is not None for c in self.classes])

    def add_image(self, X: np.ndarray, max_iou: np.ndarray, last: bool = False) -> None:
        """One image: ``X [N, D]`` scaled features of its proposals, ``max_iou [N, C]`` the IoU of each with
        the closest box of each class (0 where the image has none). ``last`` retrains every class."""
        index = self.images_seen
        self.images_seen += 1
        X = np.asarray(X, np.float32)
        W, b = self._weights()
        scores = X @ W.T + b if len(X) else np.zeros((0, len(self.classes)), np.float32)
        first = index == 0
        due = []
        for c, cache in enumerate(self.classes):
            if not len(cache.pos):
                continue
            # Each image is seen once, so a negative can't already be in the cache (R-CNN checked).
            hard = (max_iou[:, c] < self.p.neg_iou) & (scores[:, c] > self.p.hard_threshold)
            if hard.any():
                cache.neg.append(X[hard])
                cache.added += int(hard.sum())
            if (first or cache.added > self.p.retrain_limit or last) and cache.neg:
                due.append(c)
        self._retrain(due, index)

    def finish(self) -> None:
        """Retrain every class whose negatives changed since its last fit (R-CNN's "is last time")."""
        due = [c for c, cache in enumerate(self.classes) if len(cache.pos) and cache.neg and (cache.added or cache.w is None)]
        self._retrain(due, self.images_seen - 1)

    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        W = np.zeros((len(self.classes), self.dim), np.float32)
        b = np.zeros(len(self.classes), np.float32)
        for c, cache in enumerate(self.classes):
            if cache.w is not None:
                W[c], b[c] = cache.w, cache.b
        return W, b

    def _fits(self, due: list[int]) -> dict[int, tuple[np.ndarray, float, bool]]:
        """``fit_svm`` of each class in ``due`` (whose negatives are one block each); with workers and
        enough work (see ``PARALLEL_MIN_NEGATIVES``), at most ``workers`` fits in flight at a time."""
        rows = sum(len(self.classes[c].neg[0]) for c in due)
        if self.workers <= 1 or len(due) <= 1 or rows <= self.parallel_min_negatives:
            return {c: _fit(self.classes[c].pos, self.classes[c].neg[0], self.p) for c in due}
        if self._pool is None:
            from rcnn.parallel import process_pool

            self._pool = process_pool(self.workers)
        out, pending = {}, {}
        for c in due:
            if len(pending) >= self.workers:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                out.update((pending.pop(f), f.result()) for f in done)
            pending[self._pool.submit(_fit, self.classes[c].pos, self.classes[c].neg[0], self.p)] = c
        out.update((c, f.result()) for f, c in pending.items())
        return out

    def _retrain(self, due: list[int], image: int) -> None:
        """Refit the classes in ``due`` (in parallel), then update their caches in class order."""
        for c in due:
            self.classes[c].neg = [self.classes[c].negatives()]  # one block: concatenated once per retrain
        fits = self._fits(due)
        for c in due:
            self._update(c, *fits[c], image=image)

    def _update(self, c: int, w: np.ndarray, b: float, converged: bool, image: int) -> None:
        cache = self.classes[c]
        neg = cache.neg[0]
        cache.w, cache.b = w, b
        cache.retrains += 1
        cache.added = 0
        obj = objective(cache.w, cache.b, cache.pos, neg, self.p)
        z = neg @ cache.w + cache.b
        easy = z < self.p.evict_threshold
        keep = np.flatnonzero(~easy)
        over = len(keep) - self.p.max_negatives if self.p.max_negatives is not None else 0
        if over > 0:
            if not cache.capped:
                log.warning(
                    "class %d: %d hard negatives after image %d, over svm.max_negatives=%d: the %d lowest-scoring "
                    "are dropped (and as often as the bound is hit again)", c, len(keep), image, self.p.max_negatives, over,
                )  # fmt: skip
            keep = np.sort(keep[np.argsort(-z[keep], kind="stable")[: self.p.max_negatives]])
            cache.capped += over
        cache.neg = [neg[keep]]
        record = {"class": c, "image": image, **{k: round(v, 6) for k, v in obj.items()},
                  "positives": len(cache.pos), "negatives": len(neg), "evicted": int(easy.sum()),
                  "capped": max(over, 0), "converged": converged}  # fmt: skip
        self.history.append(record)
        log.info(
            "class %d, image %d: objective %.4f = %.4f (reg) + %.4f (pos) + %.4f (neg); %d negatives, %d evicted",
            c, image, obj["total"], obj["reg"], obj["loss_pos"], obj["loss_neg"], len(neg), int(easy.sum()),
        )  # fmt: skip

    def model(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(W [C, D], b [C], trained [C])``; untrained classes have ``W = 0, b = -inf``."""
        W, b = self._weights()
        trained = self.trained
        b = b.astype(np.float64)
        b[~trained] = -np.inf
        return W, b, trained


def mean_norm_scale(blocks, target_norm: float = 20.0) -> float:
    """The factor that brings the mean L2 norm of the rows of ``blocks`` (an iterable of ``[n, D]``
    arrays, e.g. a sample of images' features) to ``target_norm`` (R-CNN: 20)."""
    total, count = 0.0, 0
    for x in blocks:
        x = np.asarray(x, np.float32)
        total += float(np.linalg.norm(x, axis=1).sum())
        count += len(x)
    if count == 0 or total == 0:
        raise ValueError("cannot estimate the features' mean norm: the sample has no non-zero features")
    return target_norm / (total / count)
