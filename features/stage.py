"""``stage=features``: the 1024-d GoogLeNet feature of every proposal, cached per image.

Store ``features/<key>``: one ``<image id>.npy`` per image, float16 ``[N, 1024]``, row ``i`` the feature
of proposal ``i`` of that image's ``proposals`` entry; read it memory-mapped with
``StageStore.get_array``. The key covers the feature settings, the backbone weights actually loaded
and the proposals' key, so a new proposal setting or other weights never reuse these features.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from rcnn.config import to_dict
from rcnn.store import StageStore

from .backbone import build_googlenet, fold_batchnorm, resolve_weights
from .extract import RegionFeatures, features_roi, features_warp

log = logging.getLogger("features")

FORMAT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


def build_model(cfg) -> tuple[RegionFeatures, dict, torch.device]:
    weights = resolve_weights(cfg.backbone.weights)
    net, _ = build_googlenet(weights)
    device = resolve_device(cfg.device.value)
    model = RegionFeatures(fold_batchnorm(net), cfg.features.roi_layer.value).to(device)
    if cfg.features.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, weights.describe(), device


def run_features(ctx) -> dict:
    from proposals.stage import split_names
    from rcnn.stages import run_stage

    cfg, ds, fc = ctx.cfg, ctx.dataset, ctx.cfg.features
    proposals = StageStore.open(ctx.run_dir, "proposals", run_stage(ctx, "proposals")["key"])
    model, weights, device = build_model(cfg)
    settings = {k: v for k, v in to_dict(fc).items() if k != "batch_size"}  # batch size shapes no output
    if fc.mode.value == "warp":
        settings.pop("roi_layer"), settings.pop("roi_image_size")
    store = StageStore(
        ctx.run_dir, "features", {"features": settings, "backbone": weights},
        inputs={"proposals": proposals.key}, version=FORMAT_VERSION,
    )  # fmt: skip
    ids = [i for split in split_names(ctx) for i in ds.image_ids(split)]
    todo = store.missing(ids)
    crops_total = sum(len(proposals.get(i)["boxes"]) for i in todo)
    start = time.perf_counter()
    net_seconds = 0.0
    bar = tqdm(total=crops_total, desc=f"features ({fc.mode.value})", unit="crop", disable=not cfg.progress)
    amp = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    for image_id in todo:
        rgb = ds.load_image(image_id)
        boxes = proposals.get(image_id)["boxes"]
        t = time.perf_counter()
        with amp:
            if fc.mode.value == "warp":
                feats = features_warp(model, rgb, boxes, fc.input_size, fc.padding, fc.batch_size, fc.channels_last, device)
            else:
                feats = features_roi(model, rgb, boxes, fc.input_size, fc.padding, fc.roi_image_size,
                                     channels_last=fc.channels_last, device=device)  # fmt: skip
        net_seconds += time.perf_counter() - t
        store.put_array(image_id, feats)
        bar.update(len(boxes))
    bar.close()
    seconds = time.perf_counter() - start
    sizes = [store.array_path(i).stat().st_size for i in ids]
    metrics = {
        "stage": "features",
        "key": store.key,
        "mode": fc.mode.value,
        "device": str(device),
        "backbone_weights": weights["kind"],
        "images": len(ids),
        "images_computed_now": len(todo),
        "crops_computed_now": crops_total,
        "crops_per_second": round(crops_total / net_seconds, 2) if net_seconds else None,
        "seconds_per_image": round(net_seconds / len(todo), 3) if todo else None,
        "bytes_per_image": round(float(np.mean(sizes)), 1) if sizes else 0,
        "seconds": round(seconds, 2),
    }
    store.finish(metrics)
    rate = f"{metrics['crops_per_second']} crops/s, " if todo else "all cached, "
    print(f"features ({fc.mode.value}, {device}): {len(ids)} images, {rate}{metrics['bytes_per_image'] / 1024:.0f} KiB per image")
    return metrics
