"""The backbone shipped in the repository: GoogLeNet trained on imagenette by this project's stage=pretrain.

``backbone.weights=imagenette`` names it; offline, ``backbone.weights=auto`` falls back to it (torchvision's
ImageNet weights cannot be downloaded). It is stored compactly: the network's state dict in float16
without the auxiliary heads (~12 MB), its input normalisation, class names, training size, the recipe and
commit that trained it, its top-1, and the pooled features its float32 source gave on a fixed set of
synthetic images (``reference``), so anyone can check the float16 copy against what was trained.

Make one from a stage=pretrain run::

    python -m features.shipped data/runs/NAME/pretrain/model.pt --metrics data/runs/NAME/pretrain/metrics.json

(writes ``features/weights/googlenet-imagenette.pt``; ``--out PATH`` elsewhere). Check one::

    python -m features.shipped --check [PATH]
    python -m features.shipped --top1 112,128            # its accuracy on imagenette (where it is)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from . import backbone
from .backbone import WEIGHTS_FORMAT, googlenet_from_state, read_weights_file, trunk

__all__ = ["SHIPPED_PATH", "IMAGENETTE_NAMES", "compact", "reference_images", "check", "describe"]

SHIPPED_PATH = backbone.SHIPPED_PATH  # where the repository keeps it

# imagenette's 10 ImageNet classes (wnid -> name), in the order of their folders.
IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute",
}  # fmt: skip

# How far the float16 copy's pooled features may stray from its float32 source's, relative to the
# features' overall scale (max |a - b| / max |b|); measured on the shipped file: see features/weights/README.md.
FP16_TOLERANCE = 0.005


def reference_images(size: int, n: int = 4) -> torch.Tensor:
    """``n`` fixed ImageNet-normalised RGB images: smooth random colour fields with a few bright discs and
    bars (seeded, the same on every machine), so the features see edges and blobs rather than white noise."""
    g = torch.Generator().manual_seed(1234)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(3):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 4])).tolist()
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < (r + 4) ** 2
            img[i, :, disc] = torch.rand(3, 1, generator=g)
        y0 = int(torch.randint(0, size - 8, (1,), generator=g))
        img[i, :, y0 : y0 + 6, :] = torch.rand(3, 1, 1, generator=g)
    img = img.clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


@torch.no_grad()
def _pooled(state: dict, normalization: str, size: int) -> torch.Tensor:
    model = googlenet_from_state({k: v.float() for k, v in state.items()}, normalization)
    return trunk(model)(reference_images(size)).float()


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def compact(
    src: str | Path, dst: str | Path, metrics: dict | None = None, note: str = "", commit: str | None = None
) -> dict:
    """Write ``src`` (a weights file of stage=pretrain) to ``dst`` in float16 with what describes it;
    returns the description (without the tensors)."""
    obj = torch.load(src, map_location="cpu", weights_only=True)
    state, normalization = read_weights_file(str(src))
    state = {k: v for k, v in state.items() if not k.startswith("aux")}
    size = int(obj.get("input_size", 112)) if isinstance(obj, dict) else 112
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    classes = list(obj.get("classes", [])) if isinstance(obj, dict) else []
    m = metrics or {}
    info = {
        "format": WEIGHTS_FORMAT,
        "normalization": normalization,
        "classes": classes,
        "class_names": [IMAGENETTE_NAMES.get(c, c) for c in classes],
        "input_size": size,
        "source": obj.get("source", "") if isinstance(obj, dict) else "",
        "precision": "float16 weights (load into float32)",
        "top1_center": m.get("top1_center"),
        "top1_10crop": m.get("top1_10crop"),
        "recipe": {k: m.get(k) for k in ("input_size", "epochs", "steps", "precision", "averaged")}
        if m
        else {},
        "train_seconds": m.get("train_seconds"),
        "gemm_gflops": m.get("gemm_gflops"),
        "commit": commit or m.get("commit") or _commit(),  # the commit that trained it
        "note": note,
    }
    reference = _pooled(state, normalization, size)  # the float32 source's features
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    from rcnn.store import torch_save

    torch_save(dst, {**info, "backbone": half, "reference": reference})
    return info


def describe(path: str | Path | None = None) -> dict:
    """What a compact weights file (default: the shipped one) says about itself (no tensors)."""
    obj = torch.load(path or backbone.SHIPPED_PATH, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj.items() if k not in ("backbone", "reference")}


def check(path: str | Path | None = None) -> float:
    """The float16 file's deviation from its float32 source on the reference images: max |a - b| / max |b|
    of the pooled 1024-d features (``FP16_TOLERANCE`` is the bound the tests hold it to)."""
    obj = torch.load(path or backbone.SHIPPED_PATH, map_location="cpu", weights_only=True)
    got = _pooled(obj["backbone"], obj["normalization"], int(obj["input_size"]))
    ref = obj["reference"].float()
    return float((got - ref).abs().max() / ref.abs().max())


def top1(path: str | Path | None = None, data: str | Path = "../shared/datasets/imagenette",
         sizes: tuple[int, ...] = (112,), scheme: str = "center") -> dict[int, dict]:  # fmt: skip
    """The shipped file's accuracy on imagenette's val split, tested at each of ``sizes`` (its training size
    and above: after random-resized-crop training a network sees objects larger than a centre crop shows them,
    so a test crop somewhat larger than the training one scores higher: Touvron et al., "FixRes", 2019)."""
    from torchvision.models import googlenet

    from .backbone import fold_batchnorm
    from .pretrain import evaluate
    from .pretrain_data import ClassificationTree

    obj = torch.load(path or backbone.SHIPPED_PATH, map_location="cpu", weights_only=True)
    net = googlenet(
        weights=None,
        num_classes=len(obj["classes"]),
        aux_logits=False,
        init_weights=False,
        transform_input=False,
    )
    net.load_state_dict({k: v.float() for k, v in obj["backbone"].items()})
    net = fold_batchnorm(net.eval())
    train = ClassificationTree(data, "train")
    if train.classes != list(obj["classes"]):
        raise ValueError(f"{data}: its classes are not the backbone's ({obj['classes'][:3]}...)")
    val = ClassificationTree(data, "val", classes=train.classes)
    return {size: evaluate(net, val, scheme, size, torch.device("cpu")) for size in sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m features.shipped", description=__doc__.split("\n\n")[0])
    p.add_argument("src", nargs="?", help="a stage=pretrain model.pt to compact")
    p.add_argument("--metrics", help="its metrics.json (top-1, recipe, time: recorded in the file)")
    p.add_argument("--out", default=str(SHIPPED_PATH), help="where to write (default: the shipped file)")
    p.add_argument("--note", default="", help="a line recorded in the file")
    p.add_argument("--commit", help="the commit that trained it (default: this checkout's)")
    p.add_argument(
        "--check", nargs="?", const=str(SHIPPED_PATH), help="check a compact file against its reference"
    )
    p.add_argument(
        "--top1",
        metavar="SIZES",
        help="test the file on imagenette's val split at these sizes (e.g. 112,128)",
    )
    p.add_argument(
        "--data", default="../shared/datasets/imagenette", help="the classification tree for --top1"
    )
    a = p.parse_args(argv)
    if a.top1:
        from rcnn.machine import gemm_rates

        path = a.check or str(SHIPPED_PATH)
        for size, r in top1(path, a.data, tuple(int(x) for x in a.top1.split(","))).items():
            print(
                f"{path}: centre crop at {size} px: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} ({r['images']} images, {r['seconds']:.0f} s)"
            )
        print(f"fp32 matrix multiply: {gemm_rates()['fp32']} GFLOP/s")
        return 0
    if a.check:
        dev = check(a.check)
        print(
            json.dumps(
                {**describe(a.check), "fp16_deviation": round(dev, 5), "tolerance": FP16_TOLERANCE}, indent=1
            )
        )
        return 0 if dev <= FP16_TOLERANCE else 1
    if not a.src:
        p.error("give a model.pt to compact, or --check")
    metrics = json.loads(Path(a.metrics).read_text()) if a.metrics else None
    info = compact(a.src, a.out, metrics, a.note, a.commit)
    print(json.dumps(info, indent=1))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.1f} MB); float16 deviation {check(a.out):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
