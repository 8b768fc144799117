"""Feature extraction speed on this machine, each comparison measured in one run.

    python -m features.benchmark [--images 2] [--proposals 2000] [--repeats 5]

The network is the features stage's: BatchNorm folded into the convolutions, channels_last.

1. fp32 matrix-multiply rate (2048 x 2048 ``torch.mm``, the best of 20 before and after) and GoogLeNet's FLOPs per 224 x 224
   crop (counted by ``torch.utils.flop_counter``) give the limit in crops/s; warp-mode throughput at
   batch 64 (network alone, and with the crop warping) is reported as a fraction of it.
2. Seconds per image for 2,000 proposals: warp mode against roi mode at each split layer, on coco128
   val images with their selective search boxes (R-CNN fast mode, best-ranked 2,000).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rcnn.machine import gemm_rates

from .backbone import build_googlenet, fold_batchnorm, googlenet_gflop_per_crop
from .extract import SPLITS, RegionFeatures, features_roi, features_warp


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops() -> float:
    """The machine's fp32 matrix-multiply rate: the fastest of 20 2048^3 products (a ceiling: this
    machine's clock and neighbours make single runs vary)."""
    return gemm_rates(bf16=False, repeats=20)["fp32"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--proposals", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    plain, _ = build_googlenet("none")
    net = fold_batchnorm(plain)  # as the features stage runs it
    model = RegionFeatures(net).to(memory_format=torch.channels_last)
    unfolded = RegionFeatures(plain).to(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rate_before = matmul_gflops()
    gflop = googlenet_gflop_per_crop(model)
    crops = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net_only = 64 / median_time(lambda: model(crops), args.repeats)
        net_unfolded = 64 / median_time(lambda: unfolded(crops), args.repeats)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    xy = rng.uniform(0, 500, (256, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(20, 200, (256, 2))], 1).astype(np.float32)
    with_warp = 256 / median_time(lambda: features_warp(model, rgb, boxes, batch_size=64), max(1, args.repeats // 2))
    rate_after = matmul_gflops()
    rate = max(rate_before, rate_after)  # measured before and after the network, best kept
    limit = rate / gflop
    print(f"fp32 matmul: {rate:.1f} GFLOP/s (best of 20, before / after: {rate_before:.1f} / {rate_after:.1f}); "
          f"GoogLeNet: {gflop:.2f} GFLOP per crop -> limit {limit:.1f} crops/s")  # fmt: skip
    print(f"warp mode, batch 64: network {net_only:.1f} crops/s ({net_only / limit:.0%} of the limit); "
          f"with warping {with_warp:.1f} crops/s ({with_warp / limit:.0%})")  # fmt: skip
    print(f"  BatchNorm left unfolded: network {net_unfolded:.1f} crops/s (folding: {net_only / net_unfolded:.2f}x)")

    from proposals.selective_search import resolve_params, selective_search
    from rcnn.config import load_config
    from rcnn.datasets import build_dataset

    cfg = load_config(["dataset=coco128", "proposals.ss.mode=rcnn_fast"])
    ds = build_dataset(cfg.dataset)
    params = resolve_params(cfg.proposals.ss)
    rows = {"warp": []} | {f"roi@{s}": [] for s in SPLITS}
    for image_id in ds.image_ids(ds.test_split)[: args.images]:
        rgb = ds.load_image(image_id)
        boxes, _ = selective_search(rgb, params)
        boxes = boxes[: args.proposals]
        if len(boxes) < args.proposals:  # top up with jittered copies to the asked number
            extra = boxes[rng.integers(0, len(boxes), args.proposals - len(boxes))] + rng.normal(0, 2, (args.proposals - len(boxes), 4))
            boxes = np.concatenate([boxes, extra.astype(np.float32)])
        start = time.perf_counter()
        features_warp(model, rgb, boxes, batch_size=64)
        rows["warp"].append(time.perf_counter() - start)
        for split in SPLITS:
            m = RegionFeatures(net, split).to(memory_format=torch.channels_last)
            rows[f"roi@{split}"].append(median_time(lambda: features_roi(m, rgb, boxes), 3))
    warp = statistics.median(rows["warp"])
    print(f"\n{args.proposals} proposals per image, median over {args.images} coco128 val images:")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"  {name:18s} {t:7.2f} s/image  ({warp / t:5.1f}x faster than warp)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
