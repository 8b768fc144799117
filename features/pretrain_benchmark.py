"""Pretraining speed on this machine, each comparison measured in one run.

    python -m features.pretrain_benchmark [--data ../shared/datasets/imagenette] [--size 128] [--steps 20]

1. Training images/s of the network alone (GoogLeNet with both auxiliary heads, batch 64, synthetic
   input) in fp32 and in bf16 autocast, against the limit of 3x the forward FLOPs at this machine's
   matrix-multiply rate in that precision (measured in the same run).
2. The whole loop (decode, augment, step) on the real tree: images decoded in line, kept decoded in
   memory, or decoded and augmented by 1 DataLoader worker process while the network trains.
Each figure is the median step time over ``--steps`` steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from rcnn.config import PretrainConfig


def _config(size: int, **kw):
    pc = OmegaConf.structured(PretrainConfig)
    pc.input_size = size
    for k, v in kw.items():
        setattr(pc, k, v)
    return pc


def _median_step(trainer, batches, steps: int) -> float:
    times = []
    it = iter(batches)
    for k in range(steps + 2):
        t = time.perf_counter()
        trainer.train_step(*next(it))  # (images, labels) or the loader's (images, labels, rows)
        if k >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    from rcnn.machine import gemm_rates

    from .pretrain import Pretrainer, _forward_flops
    from .pretrain_data import ClassificationTree

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/imagenette")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    tree = ClassificationTree(args.data, "train")
    gemm = gemm_rates(bf16=True)  # the comparison below runs bf16 whether or not the CPU has it natively
    flops = _forward_flops(len(tree.classes), args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matrix multiply {gemm['fp32']} GFLOP/s fp32, "
          f"{gemm['bf16']} GFLOP/s bf16; GoogLeNet at {args.size} px: {flops / 1e9:.3f} GFLOP per forward pass")  # fmt: skip

    synthetic = (torch.randint(0, 256, (64, 3, args.size, args.size), dtype=torch.uint8), torch.randint(0, len(tree.classes), (64,)))
    rates = {}
    for precision in ("fp32", "bf16"):
        trainer = Pretrainer(_config(args.size, precision=precision), tree, device)
        rates[precision] = 64 / _median_step(trainer, iter(lambda: synthetic, None), args.steps)
        limit = gemm[precision] * 1e9 / (3 * flops)
        print(f"network alone, {precision}: {rates[precision]:.1f} images/s ({rates[precision] / limit:.0%} of the "
              f"{limit:.0f} images/s limit)")  # fmt: skip
    print(f"bf16 / fp32: {rates['bf16'] / rates['fp32']:.2f}x")

    loops = {}
    for name, workers, cache in (("decoded in line", 0, False), ("kept decoded in memory", 0, True), ("1 loader worker", 1, False)):
        t = ClassificationTree(args.data, "train")
        if cache:
            t.cache()
        trainer = Pretrainer(_config(args.size, precision="auto"), t, device, workers=workers)
        loops[name] = 64 / _median_step(trainer, trainer.loader(0), args.steps)
        print(f"whole loop, {name}: {loops[name]:.1f} images/s")
    base = loops["decoded in line"]
    print("against decoding in line: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in loops.items() if k != "decoded in line"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
