"""One fine-tuning step by part, against what this machine's matrix-multiply rate allows.

    python -m features.finetune_benchmark [--size 64] [--steps 6] [--weights imagenette]

A warp-mode step as the features stage's fine-tuning runs it (``features.finetune.FineTuner``, 128 windows: 32
foreground, 96 background, half flipped, dropout before the classifier) on synthetic 320 x 240 images, timed in
parts: drawing the batch (data), cropping and warping the windows (warp), the network and the loss (forward),
the gradients (backward) and SGD (optimiser). The limit is the step's arithmetic at the fp32 GEMM rate measured
in the same run:

    limit (s) = 3 x forward FLOPs of one crop (``torch.utils.flop_counter``) x 128 / GEMM rate

(backward costs about twice the forward), and the fraction of the limit is limit / the median step.
Warp-mode feature extraction (batch 64, BatchNorm folded, as the features stage) is measured beside it the same
way: crops/s against GEMM rate / forward FLOPs per crop.

    python -m features.finetune_benchmark --dataset roadsigns --cache-mb 368 4096 [--steps 20]

times instead whole steps as the default route takes them (64 windows, half foreground, the background the
hardest of 4x the draws) on a dataset's training images, decoded as fine-tuning decodes them, with each size of
its image cache (``finetune.image_cache_mb``) in turn: 300 random windows an image, a quarter foreground; each
size's timed steps follow 40 untimed ones, so that its cache is as full as it gets.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from rcnn.config import load_config

from .backbone import build_googlenet, fold_batchnorm, googlenet_gflop_per_crop
from .benchmark import matmul_gflops, median_time
from .extract import RegionFeatures, features_warp
from .finetune import FineTuner, Windows

PARTS = ("data", "warp", "forward", "backward", "optimiser")


def synthetic_windows(images: int, per_image: int, width: int, height: int, seed: int = 0) -> Windows:
    """``per_image`` random boxes (16-160 px, within the image) in each of ``images`` images, a quarter of them
    foreground."""
    rng = np.random.default_rng(seed)
    n = images * per_image
    largest = min(160, width, height)
    wh = rng.uniform(min(16, largest / 2), largest, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([width, height]) - wh)
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    labels = np.where(rng.random(n) < 0.25, rng.integers(1, 4, n), 0)
    return Windows(np.repeat(np.arange(images), per_image), boxes, labels)


def finetune_settings(size: int, padding: int, freeze: str | None = None):
    """The finetune and features sections of the config for a warp-mode step of R-CNN's 128 windows (32
    foreground) at ``size`` px, fp32, with the demo's rates."""
    cfg = load_config([
        "dataset.recipe=[]", "auto=false", "features.mode=warp", f"features.input_size={size}",
        f"features.padding={padding}", "features.precision=fp32", "finetune.lr=0.01", "finetune.classifier_lr_mult=1",
        "finetune.bias_lr_mult=1", f"finetune.freeze={freeze or 'null'}",
    ])  # fmt: skip
    return cfg.finetune, cfg.features


def timed_step(tuner: FineTuner) -> dict[str, float]:
    """One training step of ``tuner`` (warp mode, one process), each part timed."""
    t = {}
    start = time.perf_counter()
    tuner.train_mode()
    idx = tuner.sample()
    flips = tuner.rng.random(len(idx)) < 0.5
    keep = tuner._dropout(len(idx))
    target = torch.from_numpy(tuner.windows.labels[idx])
    t["data"] = time.perf_counter() - start

    start = time.perf_counter()
    batch = tuner.crops(idx, flips)
    t["warp"] = time.perf_counter() - start

    start = time.perf_counter()
    logits = tuner.model.net.fc(tuner.model(batch) * keep)
    loss = F.cross_entropy(logits, target)
    t["forward"] = time.perf_counter() - start

    start = time.perf_counter()
    tuner.opt.zero_grad(set_to_none=True)
    loss.backward()
    t["backward"] = time.perf_counter() - start

    start = time.perf_counter()
    tuner.opt.step()
    tuner.sched.step()
    t["optimiser"] = time.perf_counter() - start
    return t


def dataset_steps(dataset: list[str], cache_mbs: list[int], size: int, steps: int, rounds: int = 2, warmup: int = 40,
                  weights: str = "imagenette") -> dict[int, list[float]]:  # fmt: skip
    """Seconds of ``steps`` whole route steps at ``size`` px on the training images of the dataset that the
    overrides ``dataset`` name, after ``warmup`` untimed ones, for each image cache size in ``cache_mbs`` (MiB),
    ``rounds`` times in turn."""
    from rcnn.datasets import build_dataset

    ds = build_dataset(load_config(dataset).dataset)
    ids = ds.image_ids(ds.train_split)
    parts = [synthetic_windows(1, 300, ds.annotation(i).width, ds.annotation(i).height, seed=k) for k, i in enumerate(ids)]
    windows = Windows(np.repeat(np.arange(len(ids)), 300), np.concatenate([w.boxes for w in parts]),
                      np.concatenate([w.labels for w in parts]))  # fmt: skip
    cfg, fcfg = finetune_settings(size, max(1, round(size * 16 / 224)))
    cfg.batch_size, cfg.bg_candidates = 64, 4
    times: dict[int, list[float]] = {mb: [] for mb in cache_mbs}
    for _ in range(rounds):
        for mb in cache_mbs:
            cfg.image_cache_mb = mb
            tuner = FineTuner(build_googlenet(weights)[0], 3, windows, lambda k: ds.load_image(ids[k]), cfg, fcfg)
            for _ in range(warmup):
                tuner.step()
            for _ in range(steps):
                start = time.perf_counter()
                tuner.step()
                times[mb].append(time.perf_counter() - start)
            print(f"  cache {mb} MiB: {len(tuner.images.items)} of {len(ids)} images held; median step "
                  f"{statistics.median(times[mb][-steps:]):.3f} s", flush=True)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs="+", default=[64], help="crop sizes to measure (px)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per size (after 2 warm-up steps)")
    ap.add_argument("--freeze", nargs="+", default=["none"], help="finetune.freeze values to measure (none: every layer learns)")
    ap.add_argument("--weights", default="imagenette", help="backbone.weights (the times do not depend on it)")
    ap.add_argument("--dataset", help="whole route steps on this dataset's training images (see above)")
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[4096], help="with --dataset: image cache sizes (MiB)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.dataset:
        rate_before = matmul_gflops()
        times = dataset_steps([f"dataset={args.dataset}"], args.cache_mb, args.size[0], args.steps, weights=args.weights)
        print(f"fp32 matmul {max(rate_before, matmul_gflops()):.1f} GFLOP/s (best of 20, before {rate_before:.1f})")
        for mb, t in times.items():
            print(f"{args.size[0]} px, cache {mb} MiB: median step {statistics.median(t):.3f} s over {len(t)} steps")
        return 0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(64)]
    windows = synthetic_windows(len(images), 300, 320, 240)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate_before = matmul_gflops()
    rows = []
    for size in args.size:
        padding = max(1, round(size * 16 / 224))
        steps_by_freeze = {}
        for freeze in args.freeze:
            net, _ = build_googlenet(args.weights)
            cfg, fcfg = finetune_settings(size, padding, None if freeze == "none" else freeze)
            tuner = FineTuner(net, 3, windows, lambda k: images[k], cfg, fcfg)
            gflop = googlenet_gflop_per_crop(tuner.model, size)
            for _ in range(2):
                timed_step(tuner)
            steps_by_freeze[freeze] = [timed_step(tuner) for _ in range(args.steps)]
        folded = RegionFeatures(fold_batchnorm(build_googlenet(args.weights)[0])).to(memory_format=torch.channels_last)
        boxes = windows.boxes[:512]
        crops_s = len(boxes) / median_time(lambda: features_warp(folded, images[0], boxes, size, padding, 64), 3)
        rows.append((size, gflop, steps_by_freeze, crops_s))
    rate = max(rate_before, matmul_gflops())
    print(f"fp32 matmul {rate:.1f} GFLOP/s (best of 20, before {rate_before:.1f})")
    for size, gflop, steps_by_freeze, crops_s in rows:
        limit = 3 * gflop * 128 / rate
        print(f"\n{size} px: {gflop:.3f} GFLOP forward per crop; a step's limit (whole network) {limit:.3f} s")
        for freeze, steps in steps_by_freeze.items():
            parts = {p: statistics.median(s[p] for s in steps) for p in PARTS}
            total = statistics.median(sum(s.values()) for s in steps)
            share = "  ".join(f"{p} {parts[p]:.3f} ({parts[p] / total:.0%})" for p in PARTS)
            print(f"  fine-tuning, freeze={freeze}: median step {total:.3f} s -> {limit / total:.0%} of the limit")
            print(f"    {share}")
        print(f"  features (warp, batch 64, BatchNorm folded): {crops_s:.0f} crops/s; limit {rate / gflop:.0f} "
              f"-> {crops_s * gflop / rate:.0%} of it")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
