import json

import numpy as np
import pytest

from rcnn.run import main

TINY = [
    "progress=false",
    "dataset.train_images=4",
    "dataset.test_images=3",
    "dataset.width=160",
    "dataset.height=120",
    "dataset.min_size=24",
    "dataset.max_size=60",
    "proposals.method=ss_multibox",  # (the demo's recipe proposes with selective search alone)
    "multibox.epochs=2",
    "multibox.input_size=64",
    "multibox.num_priors=6",
    "multibox.top_k=5",
    "multibox.batch_size=2",
    "backbone.weights=none",
    "workers=2",
]


@pytest.fixture
def tiny(tmp_path):
    return [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}"], tmp_path / "run"


def test_proposals_stage_with_multibox(tiny):
    args, out = tiny
    assert main(["stage=proposals", *args]) == 0
    m = json.loads((out / "proposals" / "metrics.json").read_text())
    for split in ("train", "test"):
        assert {"boxes_per_image", "recall_50", "recall_70", "mabo", "seconds_per_image"} <= set(m[split])
        assert 0 < m[split]["recall_50"] <= 1 and m[split]["recall_70"] <= m[split]["recall_50"]
    assert (out / "proposals" / "recall.png").stat().st_size > 1000
    assert (out / "multibox" / "loss.png").exists()
    mb = json.loads((out / "multibox" / "metrics.json").read_text())
    assert mb["epochs"] == 2 and mb["num_priors"] == 6 and len(mb["history"]) == 2
    assert mb["epochs_computed_now"] == 2 and mb["train_seconds"] > 0
    assert m["images_computed_now"] == {"selective_search": 7, "multibox": 7} and m["compute_seconds"] > 0
    # each source's recall alone, in the same run (is MultiBox worth its minutes?), against a brute-force count
    from proposals.recall import recall_summary
    from rcnn.config import load_config
    from rcnn.datasets import build_dataset, gt_for_recall
    from rcnn.store import entry_name

    ds = build_dataset(load_config(["stage=proposals", *args]).dataset)
    for split in ("train", "test"):
        alone = m[split]["alone"]
        assert set(alone) == {"selective_search", "multibox"}
        assert max(a["recall_50"] for a in alone.values()) <= m[split]["recall_50"]
        ids = ds.image_ids(ds.train_split if split == "train" else ds.test_split)
        with_mb = []
        for i in ids:
            with np.load(out / "proposals" / m["key"] / "entries" / f"{entry_name(i)}.npz") as z:
                with_mb.append((*gt_for_recall(ds, i), z["boxes"][z["source"] == 1]))
        assert recall_summary(with_mb, ds.num_classes)["recall_50"] == alone["multibox"]["recall_50"]

    entries = sorted((out / "proposals" / m["key"] / "entries").glob("*.npz"))
    assert len(entries) == 7
    with np.load(entries[0]) as z:
        boxes, source, scores = z["boxes"], z["source"], z["scores"]
    assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(source) == len(boxes) == len(scores)
    assert (source == 1).sum() <= 5 and (source == 0).any()  # MultiBox's top 5, then selective search's
    assert (boxes[:, 2] > boxes[:, 0]).all() and boxes[:, 2].max() <= 160 and boxes[:, 3].max() <= 120

    # A rerun reuses every cache: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} | {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert main(["stage=proposals", *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "proposals" / "metrics.json").read_text())
    assert again["images_computed_now"] == {"selective_search": 0, "multibox": 0}  # a rerun says it found them

    # As after a kill: one image's selective search and combined entries missing -> computed, and said so.
    ss_entry = sorted((out / "proposals" / "ss").glob("*/entries/*.npz"))[0]
    ss_entry.unlink()
    (out / "proposals" / m["key"] / "entries" / ss_entry.name).unlink()
    assert main(["stage=proposals", *args]) == 0
    resumed = json.loads((out / "proposals" / "metrics.json").read_text())
    assert resumed["images_computed_now"] == {"selective_search": 1, "multibox": 0}


def test_multibox_with_patience_holds_out_images_and_keeps_its_best_epoch(tiny):
    args, out = tiny
    args = [a for a in args if not a.startswith("dataset.train_images")] + ["dataset.train_images=6"]
    assert main(["stage=multibox", *args, "multibox.epochs=3", "multibox.patience=1", "multibox.holdout=0.3"]) == 0
    mb = json.loads((out / "multibox" / "metrics.json").read_text())
    assert mb["heldout_images"] == 2 and mb["train_images"] == 4  # round(0.3 x 6) held out, not trained on
    recalls = [h["recall_50"] for h in mb["history"]]
    assert all(0 <= r <= 1 for r in recalls) and 1 <= len(recalls) <= 3
    assert mb["heldout_recall_50"] == max(recalls) and recalls[mb["best_epoch"] - 1] == max(recalls)
    assert len(recalls) == 3 or recalls[-1] <= max(recalls[:-1])  # stopped early only where the last did not rise
    # Without patience the key is the one models from before the setting have; with it, another.
    from proposals.stage import multibox_store
    from rcnn.config import load_config
    from rcnn.stages import RunContext

    key = lambda extra: multibox_store(RunContext(load_config(["stage=multibox", *args, *extra]))).key  # noqa: E731
    assert key([]) == key(["multibox.holdout=0.5"]) != key(["multibox.patience=1"])


def test_selective_search_alone_and_top_n(tiny):
    args, out = tiny
    assert main(["stage=proposals", *args, "proposals.method=ss", "proposals.top_n=10", "proposals.splits=[test]"]) == 0
    m = json.loads((out / "proposals" / "metrics.json").read_text())
    assert "train" not in m and m["test"]["boxes_per_image"] <= 10
    assert not (out / "multibox").exists()
    assert m["selective_search"]["mode"] == "googlenet" and m["selective_search"]["ks"] == [100, 200]


def test_benchmark_table_in_one_run(tiny, capsys):
    from proposals import benchmark

    args, out = tiny
    only = ["OpenCV default fast mode", "GoogLeNet variant, first 150 shuffled"]
    assert benchmark.main([*args, "proposals.top_n=20", "--only", only[0], "--only", only[1], "--split", "train"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == only
    assert rows[0].endswith("| 1.00x | 100% |")
    assert float(rows[0].split(" | ")[1]) <= 20  # the command line's cap, where the method sets none
    with pytest.raises(SystemExit, match="unknown method"):
        benchmark.run(args, ["no such method"])
