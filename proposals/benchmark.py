"""Compare proposal methods on one dataset's test split, in one run, as a markdown table.

    python -m proposals.benchmark dataset=coco128 [key=value ...] [--only NAME ...] [--split train|test]
        [--table PATH]

Every method runs through ``stage=proposals`` with the overrides below (plus the command line's),
each into the same run folder, so caches are shared (MultiBox is trained once) and every time is
measured on the same machine in the same run. Times are per image, on one core each (the stage
runs ``workers`` images at once); ratios are to OpenCV's default fast mode. ``--split train`` measures
on the train split instead (a check that settings chosen on one split hold on the other; MultiBox is
then scored on its own training images).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from rcnn.config import load_config
from rcnn.datasets import split_names
from rcnn.stages import RunContext, run_stage

METHODS = {
    "OpenCV default fast mode": ["proposals.method=ss", "proposals.ss.mode=opencv_fast"],
    "R-CNN fast mode": ["proposals.method=ss", "proposals.ss.mode=rcnn_fast"],
    "GoogLeNet variant (k doubled)": ["proposals.method=ss", "proposals.ss.mode=googlenet"],
    "selectivesearch package (R-CNN k)": [
        "proposals.method=ss", "proposals.ss.backend=selectivesearch", "proposals.ss.mode=rcnn_fast",
    ],  # fmt: skip
    "MultiBox alone": ["proposals.method=multibox"],
    "GoogLeNet variant + MultiBox": ["proposals.method=ss_multibox", "proposals.ss.mode=googlenet"],
    # Beyond the papers: near-duplicates merged (proposals.ss.merge_iou), the closest settings to the goal.
    "GoogLeNet variant, min side 8, merged at IoU 0.7, + MultiBox": [
        "proposals.method=ss_multibox", "proposals.ss.mode=googlenet", "proposals.ss.min_box_side=8",
        "proposals.ss.merge_iou=0.7",
    ],
    "OpenCV fast settings, merged at IoU 0.7, + MultiBox": [
        "proposals.method=ss_multibox", "proposals.ss.mode=opencv_fast", "proposals.ss.merge_iou=0.7",
    ],
    # Superpixels 1.5x R-CNN's instead of 2x, small boxes kept, near-duplicates merged harder.
    "k 75/150, min side 8, merged at IoU 0.6": [
        "proposals.method=ss", "proposals.ss.mode=googlenet", "proposals.ss.ks=[75,150]",
        "proposals.ss.min_box_side=8", "proposals.ss.merge_iou=0.6",
    ],
    "k 75/150, min side 8, merged at IoU 0.6, + MultiBox": [
        "proposals.method=ss_multibox", "proposals.ss.mode=googlenet", "proposals.ss.ks=[75,150]",
        "proposals.ss.min_box_side=8", "proposals.ss.merge_iou=0.6",
    ],
    # A top-N cap follows proposals.ss.order: OpenCV's rank puts the smallest regions first.
    "GoogLeNet variant, first 150 in OpenCV's order": [
        "proposals.method=ss", "proposals.ss.mode=googlenet", "proposals.ss.order=opencv", "proposals.top_n=150",
    ],
    "GoogLeNet variant, first 150 shuffled": [
        "proposals.method=ss", "proposals.ss.mode=googlenet", "proposals.ss.order=shuffle", "proposals.top_n=150",
    ],
}
BASELINE = "OpenCV default fast mode"


def machine() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"


def run(overrides: list[str], only: list[str] | None = None, split: str = "test") -> tuple[dict, dict]:
    unknown = sorted(set(only or ()) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    results, walls = {}, {}
    for name, extra in METHODS.items():
        if only and name not in only:
            continue
        cfg = load_config(["stage=proposals", f"proposals.splits=[{split}]", *overrides, *extra])
        ctx = RunContext(cfg)
        start = time.perf_counter()
        metrics = run_stage(ctx, "proposals")
        walls[name] = time.perf_counter() - start
        results[name] = metrics[split_names(ctx)[0]]
        print(f"== {name}: {results[name]}", file=sys.stderr)
    return results, walls


def table(results: dict) -> str:
    base = results.get(BASELINE)
    lines = [
        "| method | boxes / image | recall@0.5 | recall@0.7 | MABO | s / image | time vs OpenCV fast | boxes vs OpenCV fast |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results.items():
        t_ratio = f"{m['seconds_per_image'] / base['seconds_per_image']:.2f}x" if base else "-"
        b_ratio = f"{m['boxes_per_image'] / base['boxes_per_image']:.0%}" if base else "-"
        lines.append(
            f"| {name} | {m['boxes_per_image']:.0f} | {m['recall_50']:.3f} | {m['recall_70']:.3f} | "
            f"{m['mabo']:.3f} | {m['seconds_per_image']:.3f} | {t_ratio} | {b_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for python -m rcnn.run")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="a method to run (repeatable)")
    parser.add_argument("--split", choices=["train", "test"], default="test", help="the dataset split to measure")
    parser.add_argument("--table", default="", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    only = args.only or None
    results, walls = run(args.overrides, only, args.split)
    text = table(results)
    print(f"\nMachine: {machine()}\n")
    print(text)
    print("\nWall seconds per method (including cached work): " + ", ".join(f"{k}: {v:.0f}" for k, v in walls.items()))
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
