"""``stage=benchmark``: the whole chain on one dataset, then one report.

Runs ``stage=all`` (every stage, cached ones included) and writes ``<out>/benchmark/report.md`` and
``report.json``: mAP figures, proposal recall, per-stage seconds (and seconds per image), feature bytes
per image and a description of the machine. ``benchmark.append_to=BENCHMARKS.md`` appends the report
to that file. Times are this run's: a stage found complete in the cache takes about 0 s, so time a
chain with a fresh ``out=``.
"""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path

from rcnn.machine import describe
from rcnn.store import atomic_write, write_json

__all__ = ["run_benchmark", "report_markdown"]

# Images each stage works on, for seconds per image: "train", "test" or "both" splits.
_PER = {"data": "both", "multibox": "train", "proposals": "both", "finetune": "train", "features": "both",
        "svm": "train", "detect": "test", "eval": "test"}  # fmt: skip


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def report_markdown(r: dict) -> str:
    m, ev = r["machine"], r["eval"]
    gpu = m["gpu"] or "no GPU"
    lines = [
        f"## Benchmark: {r['dataset']}, {r['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}; torch {m['torch']}, "
        f"torchvision {m['torchvision']}, Python {m['python']}. CPU matrix multiply measured in this run: "
        f"{m['gemm_gflops']['fp32']} GFLOP/s fp32, {m['gemm_gflops']['bf16'] or 'no native'} GFLOP/s bf16.",
        "",
        "```bash",
        r["command"],
        "```",
        "",
        "| VOC07 mAP | VOC mAP | ILSVRC mAP | COCO mAP | COCO AP50 | COCO AP75 |",
        "|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(_pct(ev.get(k)) for k in ("voc07_map", "voc_map", "ilsvrc_map", "coco_map", "coco_map50", "coco_map75")) + " |",
        "",
        "| proposals | boxes / image | recall@0.5 | recall@0.7 | MABO |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for split, p in r["proposals"].items():
        lines.append(f"| {split} | {p['boxes_per_image']:.0f} | {p['recall_50']:.3f} | {p['recall_70']:.3f} | {p['mabo']:.3f} |")
    f = r["features"]
    lines += [
        "",
        f"Features: {f['mode']} mode on {f['device']}, {f['bytes_per_image'] / 1024:.0f} KiB per image"
        + (f", {f['crops_per_second']} crops/s" if f.get("crops_per_second") else " (cached)")
        + f"; backbone weights: {f['backbone_weights']}"
        + {"none": " (RANDOM INITIALISATION: untrained features)", "imagenette": " (the repository's imagenette backbone)"}.get(f["backbone_weights"], "")
        + (f"; SVM C = {r['svm']['C']:g}" + (" (chosen by cross-validation over the train images)" if r["svm"].get("C_selection") else "")
           if r.get("svm", {}).get("C") is not None else "") + ".",
        "",
        "| stage | seconds | images | seconds / image | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in r["stages"]:
        per = f"{s['seconds_per_image']:.3f}" if s["seconds_per_image"] is not None else "-"
        peak = f"{s['peak_rss_mb']:.0f}" if s.get("peak_rss_mb") else "-"
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['images']} | {per} | {peak} |")
    lines += ["", f"Total: {r['seconds']:.1f} s. Times are this run's; a stage found in the cache takes ~0 s. "
              "Peak memory: the main process's resident peak during the stage (worker processes not counted).", ""]
    return "\n".join(lines)


def run_benchmark(ctx) -> dict:
    from rcnn.stages import run_stage

    ds = ctx.dataset
    run_stage(ctx, "all")
    res = ctx.results
    images = {"train": len(ds.image_ids(ds.train_split)), "test": len(ds.image_ids(ds.test_split))}
    images["both"] = images["train"] + images["test"] if ds.train_split != ds.test_split else images["train"]
    stages = []
    for name, seconds in ctx.timings.items():
        if name == "benchmark":
            continue
        n = images[_PER.get(name, "both")]
        stages.append({"stage": name, "seconds": round(seconds, 2), "images": n,
                       "seconds_per_image": round(seconds / n, 4) if n else None,
                       "peak_rss_mb": res.get(name, {}).get("peak_rss_mb")})  # fmt: skip
    proposals = res.get("proposals", {})
    ev = res.get("eval", {})
    report = {
        "dataset": ds.name,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python -m rcnn.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": describe(),
        "eval": {k: ev.get(k) for k in ("voc07_map", "voc_map", "ilsvrc_map", "coco_map", "coco_map50", "coco_map75")},
        "proposals": {s: proposals[s] for s in (ds.train_split, ds.test_split) if s in proposals and isinstance(proposals[s], dict)},
        "features": {k: res.get("features", {}).get(k) for k in ("mode", "device", "bytes_per_image", "crops_per_second", "backbone_weights")},
        "svm": {k: res.get("svm", {}).get(k) for k in ("C", "C_selection", "degenerate_classes")},
        "stages": stages,
        "seconds": round(sum(s["seconds"] for s in stages), 2),
    }  # fmt: skip
    out = ctx.run_dir / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    text = report_markdown(report)
    write_json(out / "report.json", report)
    atomic_write(out / "report.md", lambda f: f.write(text.encode()))
    target = ctx.cfg.benchmark.append_to
    if target:
        path = Path(target)
        before = path.read_text() if path.exists() else ""
        sep = "" if not before or before.endswith("\n\n") else ("\n" if before.endswith("\n") else "\n\n")
        atomic_write(path, lambda f: f.write((before + sep + text).encode()))
        print(f"report appended to {path}")
    print(text)
    return report
