"""The networks' speed on a GPU, in one run of a few minutes (issue #12's GPU check).

    python -m features.gpu_benchmark [--out data/gpu] [--weights none|PATH] [--device cuda|cpu] [--quick]

Writes ``<out>/gpu.json`` and ``<out>/gpu.md`` (and prints the latter):

1. the card, torch, CUDA, and the matrix-multiply rates (fp32 strict, tf32, bf16, fp16) measured now;
2. warp mode: the network's crops/s at fp32 / fp16 / bf16, batch 64 and 256, crops ready on the GPU;
   per image of 2,000 proposals, crops warped on the GPU (the stage without loader workers) against the
   crops/s one CPU thread warps (each loader worker's share);
3. roi mode: images/s, 2,000 proposals at 600 px, pooled at ``inception5b``;
4. fine-tuning (warp, 224 px, batch 128) and pretraining (224 px, batch 128, both auxiliary heads,
   1,000 classes) steps and images/s, fp32 against the automatic precision (bf16 where supported);
5. fp16 and bf16 features against strict fp32 (TF32 off) on the same crops: relative L2 error and
   cosine, with the tolerance they must meet (the cache stores float16: 2^-11 relative rounding).

Every time is the median of ``--repeats`` timed runs after warm-up, with the GPU synchronised. Inputs are
synthetic (a demo-style image of shapes on clutter, random boxes, random batches), so the run needs no
dataset. torchrun is not measured here (it needs a dataset: the README's torchrun command on the demo
measures it), and the report says so.
Without a GPU, ``--device cuda`` (the default) writes a report saying there is none and exits 0;
``--device cpu --quick`` runs every measurement at toy sizes (the tests do).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

PROPOSALS = 2000  # boxes per image, as R-CNN's selective search gives


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    mb = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(mb, 1)


def _precisions(device: torch.device) -> dict[str, torch.dtype | None]:
    """Autocast dtypes to compare (None = fp32); fp16 only where it is a GPU's native type."""
    out = {"fp32": None, "bf16": torch.bfloat16}
    if device.type == "cuda":
        out["fp16"] = torch.float16
    return out


def matmul_rates(device: torch.device, n: int, repeats: int) -> dict:
    """TFLOP/s of an ``n^3`` product in each precision (fp32 with and without TF32 on a GPU)."""
    rates = {}
    kinds = [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False)]
    if device.type == "cuda":
        kinds += [("tf32", torch.float32, True), ("fp16", torch.float16, False)]
    for name, dtype, tf32 in kinds:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            rates[name] = float(f"{2 * n**3 / median_seconds(lambda: a @ b, device, repeats) / 1e12:.3g}")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return rates


def _scene(width: int, height: int, boxes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A demo-style RGB image (shapes on clutter) and ``boxes`` random proposals inside it."""
    from rcnn.datasets.demo import draw_image

    params = {"seed": seed, "width": width, "height": height, "max_objects": 6, "min_size": 32,
              "max_size": min(width, height) // 2, "class_colours": 1}  # fmt: skip
    rgb, _ = draw_image(params, "train", 0)
    rng = np.random.default_rng(seed)
    wh = rng.uniform(16, [width, height], size=(boxes, 2))
    xy = rng.uniform(0, 1, size=(boxes, 2)) * ([width, height] - wh)
    return rgb, np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _region_model(weights: str, split: str, device: torch.device):
    from .backbone import build_googlenet, fold_batchnorm, resolve_weights
    from .extract import RegionFeatures

    net, _ = build_googlenet(resolve_weights(weights))
    return RegionFeatures(fold_batchnorm(net), split).to(device).to(memory_format=torch.channels_last)


def warp_speed(model, device, size: int, batches: list[int], repeats: int) -> list[dict]:
    from .backbone import autocast

    rows = []
    for batch in batches:
        crops = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        for name, dtype in _precisions(device).items():
            with torch.inference_mode(), autocast(dtype, device):
                s = median_seconds(lambda: model(crops), device, repeats)
            rows.append({"precision": name, "batch": batch, "crops_per_second": round(batch / s, 1),
                         "peak_mb": _peak_mb(device)})  # fmt: skip
    return rows


def image_speed(model, device, rgb, boxes, size: int, padding: int, repeats: int, roi_image_size: int | None) -> list[dict]:
    """Per image: ``features_warp`` (crops warped on ``device``) or ``features_roi``, each precision."""
    from .backbone import autocast
    from .extract import features_roi, features_warp

    rows = []
    for name, dtype in _precisions(device).items():
        with autocast(dtype, device):
            if roi_image_size is None:
                run = lambda: features_warp(model, rgb, boxes, size, padding, 256, True, device)  # noqa: E731
            else:
                run = lambda: features_roi(model, rgb, boxes, size, padding, roi_image_size, 256, True, device)  # noqa: E731
            s = median_seconds(run, device, repeats, warmup=1)
        rows.append({"precision": name, "images_per_second": round(1 / s, 3),
                     "crops_per_second": round(len(boxes) / s, 1), "peak_mb": _peak_mb(device)})  # fmt: skip
    return rows


def cpu_warp_speed(rgb, boxes, size: int, padding: int, repeats: int) -> float:
    """Crops/s that one CPU thread warps (what one loader worker of the features stage does)."""
    from .warp import normalize_image, warp_crops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = normalize_image(rgb)
        b = torch.from_numpy(boxes[:256])
        s = median_seconds(lambda: warp_crops(image, b, size, padding), torch.device("cpu"), repeats, warmup=1)
    finally:
        torch.set_num_threads(threads)
    return round(len(b) / s, 1)


def feature_identity(model, device, rgb, boxes, size: int, padding: int) -> list[dict]:
    """fp16 / bf16 features against strict fp32 (TF32 off for convolutions and products) on the same crops."""
    from .backbone import autocast
    from .extract import features_warp

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = torch.from_numpy(features_warp(model, rgb, boxes, size, padding, 256, True, device)).double()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    rows = []
    tolerance = {"fp16": 0.01, "bf16": 0.05, "fp32": 0.001}  # relative L2; fp32 row = TF32 (the default) or CPU
    for name, dtype in _precisions(device).items():
        with autocast(dtype, device):
            out = torch.from_numpy(features_warp(model, rgb, boxes, size, padding, 256, True, device)).double()
        rel = (out - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
        label = "fp32 (TF32 convolutions)" if name == "fp32" and device.type == "cuda" else name
        rows.append({"precision": label, "relative_l2_median": float(rel.median()), "relative_l2_max": float(rel.max()),
                     "cosine_min": float(cos.min()), "tolerance": tolerance[name], "within": bool(rel.max() <= tolerance[name])})  # fmt: skip
    return rows


def finetune_speed(weights: str, device, size: int, batch: int, steps: int) -> list[dict]:
    from rcnn.config import FeaturesConfig, FinetuneConfig

    from .backbone import build_googlenet, precision_name, resolve_weights
    from .finetune import FineTuner, label_windows

    images = [_scene(640, 480, 300, seed) for seed in range(4)]
    gts = [(b[:3], np.array([0, 1, 2])) for _, b in images]  # three "objects" an image; the rest label themselves
    windows = label_windows([b for _, b in images], gts)
    rows = []
    for precision in ("fp32", "auto"):
        cfg = OmegaConf.structured(FinetuneConfig)
        cfg.batch_size, cfg.fg_per_batch = batch, batch // 4
        fcfg = OmegaConf.structured(FeaturesConfig)
        fcfg.input_size, fcfg.padding, fcfg.precision = size, round(16 * size / 224), precision
        net, _ = build_googlenet(resolve_weights(weights))
        tuner = FineTuner(net, 3, windows, lambda k: images[k][0], cfg, fcfg, device=device)
        s = median_seconds(tuner.step, device, steps)
        rows.append({"precision": precision_name(tuner.amp),
                     "steps_per_second": round(1 / s, 2), "windows_per_second": round(batch / s, 1), "peak_mb": _peak_mb(device)})  # fmt: skip
    return rows


class _Classes:
    """What :class:`Pretrainer` reads of a classification tree when it is given batches directly."""

    def __init__(self, n: int, images: int):
        self.classes, self._n = [f"c{k}" for k in range(n)], images

    def __len__(self) -> int:
        return self._n


def pretrain_speed(device, size: int, batch: int, steps: int) -> list[dict]:
    from rcnn.config import PretrainConfig

    from .backbone import precision_name
    from .pretrain import Pretrainer

    rows = []
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 1000, (batch,))
    if device.type == "cuda":
        images = images.pin_memory()
    for precision in ("fp32", "auto"):
        pc = OmegaConf.structured(PretrainConfig)
        pc.input_size, pc.batch_size, pc.precision = size, batch, precision
        trainer = Pretrainer(pc, _Classes(1000, 1_281_167), device)
        s = median_seconds(lambda: trainer.train_step(images, labels), device, steps)
        rows.append({"precision": precision_name(trainer.amp),
                     "images_per_second": round(batch / s, 1), "peak_mb": _peak_mb(device)})  # fmt: skip
    return rows


def _cell(x) -> str:
    return "-" if x is None else str(x)


def _markdown(r: dict) -> str:
    if r.get("gpu") is None and r["device"] == "cuda":
        return f"# GPU benchmark\n\nNo GPU: {r['reason']}. Nothing was measured.\n"
    m = r["matmul_tflops"]
    lines = [
        f"# GPU benchmark: {r.get('gpu') or 'CPU'} ({r['date']})", "",
        f"torch {r['torch']}, CUDA {r['cuda']}, Python {r['python']}; `{r['command']}`; weights: {r['weights']}.",
        "Matrix multiply (TFLOP/s, measured in this run): " + ", ".join(f"{k} {v}" for k, v in m.items()) + ".", "",
        f"| warp mode, network alone ({r['size']} px) | batch | crops/s | peak MiB |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    lines += [f"| {x['precision']} | {x['batch']} | {x['crops_per_second']} | {_cell(x['peak_mb'])} |" for x in r["warp_network"]]
    lines += ["", f"| per image ({r['proposals']} proposals, {r['image']}) | images/s | crops/s | peak MiB |",
              "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| warp, crops warped on the device, {x['precision']} | {x['images_per_second']} | {x['crops_per_second']} | {_cell(x['peak_mb'])} |"
              for x in r["warp_image"]]  # fmt: skip
    lines += [f"| roi ({r['roi_image_size']} px, inception5b), {x['precision']} | {x['images_per_second']} | {x['crops_per_second']} | {_cell(x['peak_mb'])} |"
              for x in r["roi_image"]]  # fmt: skip
    lines += [f"| one CPU thread warping (a loader worker's share) | | {r['cpu_warp_crops_per_second']} | |", ""]
    lines += ["| training | precision | steps/s | images (windows)/s | peak MiB |", "|---|---|---:|---:|---:|"]
    lines += [f"| fine-tuning (warp, batch {r['finetune_batch']}) | {x['precision']} | {x['steps_per_second']} | {x['windows_per_second']} | {_cell(x['peak_mb'])} |"
              for x in r["finetune"]]  # fmt: skip
    lines += [f"| pretraining (batch {r['pretrain_batch']}, aux heads) | {x['precision']} | {1 / (r['pretrain_batch'] / x['images_per_second']):.2f} | {x['images_per_second']} | {_cell(x['peak_mb'])} |"
              for x in r["pretrain"]]  # fmt: skip
    lines += ["", "| features against strict fp32 | relative L2, median | max | cosine, min | tolerance | within |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    lines += [f"| {x['precision']} | {x['relative_l2_median']:.2e} | {x['relative_l2_max']:.2e} | {x['cosine_min']:.6f} | {x['tolerance']} | {'yes' if x['within'] else 'NO'} |"
              for x in r["identity"]]  # fmt: skip
    lines += ["", f"torchrun: {r['torchrun']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    import sys

    import torchvision

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--weights", default="none", help="backbone weights (none: random; throughput does not depend on them)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks every measurement runs (CPU tests)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r: dict = {"device": args.device, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "command": "python -m features.gpu_benchmark " + " ".join(argv if argv is not None else sys.argv[1:]),
               "weights": args.weights}  # fmt: skip
    if args.device == "cuda" and not torch.cuda.is_available():
        r.update(gpu=None, reason=f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
    else:
        device = torch.device(args.device)
        quick = args.quick
        repeats = args.repeats or (2 if quick else 10)
        size, batches = (64, [4, 8]) if quick else (224, [64, 256])
        rgb, boxes = _scene(160, 120, 24) if quick else _scene(640, 480, PROPOSALS)
        roi_size = 96 if quick else 600
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        r.update(gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                 gpus_visible=torch.cuda.device_count(), size=size, proposals=len(boxes),
                 image=f"{rgb.shape[1]} x {rgb.shape[0]}", roi_image_size=roi_size,
                 cudnn_tf32=torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None)  # fmt: skip
        steps = (lambda text: print(text, flush=True))
        steps("matrix multiply")
        r["matmul_tflops"] = matmul_rates(device, 256 if quick else 8192, repeats)
        model = _region_model(args.weights, "inception4e", device)
        steps("warp mode")
        r["warp_network"] = warp_speed(model, device, size, batches, repeats)
        r["warp_image"] = image_speed(model, device, rgb, boxes, size, round(16 * size / 224), max(repeats // 2, 2), None)
        r["cpu_warp_crops_per_second"] = cpu_warp_speed(rgb, boxes, size, round(16 * size / 224), max(repeats // 2, 2))
        steps("roi mode")
        roi_model = _region_model(args.weights, "inception5b", device)
        r["roi_image"] = image_speed(roi_model, device, rgb, boxes, size, round(16 * size / 224), repeats, roi_size)
        steps("feature identity")
        r["identity"] = feature_identity(model, device, rgb, boxes, size, round(16 * size / 224))
        steps("fine-tuning")
        r["finetune_batch"] = 16 if quick else 128
        r["finetune"] = finetune_speed(args.weights, device, size, r["finetune_batch"], repeats)
        steps("pretraining")
        r["pretrain_batch"] = 8 if quick else 128
        r["pretrain"] = pretrain_speed(device, size, r["pretrain_batch"], repeats)
    r["torchrun"] = ("not measured by this script (it needs a dataset): run torchrun --nproc_per_node=N -m rcnn.run "
                     f"stage=finetune finetune.enabled=true; {torch.cuda.device_count()} GPU(s) visible")  # fmt: skip
    (out / "gpu.json").write_text(json.dumps(r, indent=1) + "\n")
    md = _markdown(r)
    (out / "gpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
