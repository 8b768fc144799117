"""shard=I/N: the per-image stages split over processes give the single-process run's entries."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rcnn.config import ConfigError, load_config
from rcnn.run import main
from rcnn.shard import current_shard, mine, parse_shard
from rcnn.store import StageStore

from .test_detect import TINY

REPO = Path(__file__).resolve().parents[1]


def test_parse_and_pick():
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError, match="0 <= I < N"):
            parse_shard(bad)
    with pytest.raises(ConfigError, match="shard must be I/N"):
        load_config(["shard=2/2"])
    ids = list(range(7))
    cfg = load_config(["shard=1/3"])
    assert mine(cfg, ids) == [1, 4]
    assert sorted(sum((mine(load_config([f"shard={i}/3"]), ids) for i in range(3)), [])) == ids
    assert mine(load_config([]), ids) == ids


def test_torchrun_rank_is_the_shard(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert current_shard(load_config([])) == (2, 4)
    assert current_shard(load_config(["shard=0/2"])) == (0, 2)  # the command line wins
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert current_shard(load_config([])) is None


def entries(run: Path, stage: str) -> dict:
    """Every entry of the stage's latest key: {image id: {name: array}}."""
    key = json.loads((run / stage / "metrics.json").read_text())["key"]
    store = StageStore.open(run, stage, key)
    return {f.name: dict(np.load(f)) if f.suffix == ".npz" else np.load(f) for f in sorted(store.entries_dir.iterdir())}


def same_entries(a: dict, b: dict) -> None:
    """Equal arrays, entry for entry (the files' bytes differ only by the zip archives' timestamps)."""
    assert a.keys() == b.keys() and a
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, dict):
            assert x.keys() == y.keys(), name
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}: {k}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_sharded_stages_give_the_single_process_entries(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="rcnn")
    common = [*TINY, f"dataset.root={tmp_path / 'demo'}", "svm.C=0.001"]  # (C chosen or not: the same here)
    one = [*common, f"out={tmp_path / 'one'}"]
    assert main(["stage=detect", *one]) == 0
    two = [*common, f"out={tmp_path / 'two'}"]
    # A training stage is built once, without shard=; a sharded run that needs one says so.
    capsys.readouterr()
    assert main(["stage=features", "shard=0/2", *two]) == 1
    assert "stage multibox trains one model from every image" in capsys.readouterr().err
    assert main(["stage=multibox", *two]) == 0
    caplog.clear()
    assert main(["stage=features", "shard=0/2", *two]) == 0
    assert "shard 0/2: its images are done" in caplog.text
    assert not (tmp_path / "two" / "features" / "metrics.json").exists()  # waits for shard 1
    assert main(["stage=features", "shard=1/2", *two]) == 0  # the last shard writes the metrics
    m = json.loads((tmp_path / "two" / "features" / "metrics.json").read_text())
    assert m["images"] == 6 and m["images_computed_now"] == 3
    assert main(["stage=svm", *two]) == 0
    assert main(["stage=detect", "shard=1/2", *two]) == 0
    assert main(["stage=eval", "shard=0/2", *two]) == 0  # detects shard 0's image, evaluates all
    for stage in ("proposals", "features", "detect"):
        a, b = entries(tmp_path / "one", stage), entries(tmp_path / "two", stage)
        assert len(a) == {"proposals": 6, "features": len(b), "detect": 2}[stage]
        same_entries(a, b)
    assert (tmp_path / "one" / "detect" / "detections.json").read_bytes() == (
        tmp_path / "two" / "detect" / "detections.json").read_bytes()  # fmt: skip
    ev = json.loads((tmp_path / "two" / "eval" / "metrics.json").read_text())
    assert ev["detections_count"] == len(json.loads((tmp_path / "one" / "detect" / "detections.json").read_text()))


def test_two_shards_at_once_on_one_run_folder(tmp_path):
    """Two processes write the same stores at the same time (selective search only: no model)."""
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", "proposals.method=ss", "stage=proposals"]
    assert main([*args, f"out={tmp_path / 'one'}"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "rcnn.run", *args, f"out={tmp_path / 'two'}", f"shard={i}/2"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    if not (tmp_path / "two" / "proposals" / "metrics.json").exists():  # both finished before seeing the other's
        assert main([*args, f"out={tmp_path / 'two'}"]) == 0  # a later run finds every entry
    same_entries(entries(tmp_path / "one", "proposals"), entries(tmp_path / "two", "proposals"))
    one = json.loads((tmp_path / "one" / "proposals" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "proposals" / "metrics.json").read_text())
    assert one["key"] == two["key"] and one["test"]["recall_50"] == two["test"]["recall_50"]
    assert np.isclose(one["train"]["mabo"], two["train"]["mabo"])


def test_torchrun_runs_the_chain_as_one_process(tmp_path, one_thread):
    """torchrun --standalone --nproc_per_node=2, stage=eval with fine-tuning: the per-image stages take their
    shard from the rank and wait for each other, fine-tuning is data-parallel (DistributedDataParallel on
    gloo), rank 0 builds the SVMs and evaluates while rank 1 waits."""
    import torch

    # Warp mode: fine-tuning trains BatchNorm, whose statistics under torchrun are the whole batch's
    # (CpuSyncBatchNorm over gloo; with per-rank statistics the first loss is 2.7% off and the weights 1e-3).
    # In fp32 on every CPU: the tolerances below are fp32's (on a CPU with native bf16, precision=auto trains in
    # bf16 and the two runs' weights part by 2e-4).
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", "proposals.method=ss", "features.mode=warp", "features.padding=4",
            "finetune.enabled=true", "finetune.iterations=3", "finetune.lr=0.0001", "finetune.batch_size=16",
            "finetune.fg_per_batch=4", "svm.C=0.001", "stage=eval", "features.precision=fp32"]  # fmt: skip
    # One thread in every process, as torchrun gives each rank: with another thread count the network
    # sums in another order and features differ in their last fp16 bit.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    assert main([*args, f"out={tmp_path / 'one'}"]) == 0  # here, on one thread
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "rcnn.run", *args, f"out={tmp_path / 'two'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 1 of 2" in r.stderr and "stage svm: rank 0 builds it; rank 1 waits" in r.stderr
    same_entries(entries(tmp_path / "one", "proposals"), entries(tmp_path / "two", "proposals"))
    # Fine-tuning: the same global batches, each rank's half; gradients averaged over the ranks. Equal up to
    # float rounding: the ranks sum their halves' gradients in another order (then gloo sums the two) and run
    # oneDNN at other batch sizes; in warp mode PyTorch's fp32 BatchNorm backward (one process) is itself ~1%
    # from fp64 on this tiny network (BENCHMARKS.md). Measured after 3 steps at lr 1e-4: 1.6e-5 at most (roi
    # mode, BatchNorm frozen: 1e-6; warp mode with per-rank BatchNorm: 1e-3). The tolerance: 1e-4, for weights
    # of order 0.01-1. At R-CNN's default lr 0.001 a random network's chaotic first steps amplify rounding
    # (4e-4 in roi mode), so the test trains slowly.
    models = [torch.load(tmp_path / run / "finetune" / json.loads((tmp_path / run / "finetune" / "metrics.json")
                         .read_text())["key"] / "model.pt", weights_only=True) for run in ("one", "two")]  # fmt: skip
    for part in ("backbone", "classifier"):
        assert models[0][part].keys() == models[1][part].keys()
        for name, a in models[0][part].items():
            b = models[1][part][name]
            # BatchNorm's running statistics (of order 1, averages of batch statistics over 64 values at
            # inception5's 2 x 2 maps): 2.5e-4 at most, measured.
            assert (a - b).abs().max() <= (1e-3 if "running" in name else 1e-4), f"{part}.{name}"
    tuned = [json.loads((tmp_path / run / "finetune" / "metrics.json").read_text()) for run in ("one", "two")]
    assert tuned[0]["mode"] == "warp"
    # The first batch: the same loss up to float rounding (PyTorch's BatchNorm kernel in one process, the
    # synchronised one in two: 3e-6 apart).
    assert np.isclose(tuned[0]["loss_first"], tuned[1]["loss_first"], rtol=1e-4)
    assert np.isclose(tuned[0]["loss_last20"], tuned[1]["loss_last20"], rtol=1e-3)  # 5e-5 measured
    # Features from the two models: this random network amplifies weight noise (1e-6 of random noise added
    # to the weights moved its features by 3e-4 relative L2; the two runs' models differ by 5e-4 to 1e-3).
    features = [entries(tmp_path / run, "features") for run in ("one", "two")]
    assert features[0].keys() == features[1].keys()
    for name, x in features[0].items():
        a, b = np.float32(x), np.float32(features[1][name])
        assert np.linalg.norm(a - b) <= 5e-3 * np.linalg.norm(a), (name, np.linalg.norm(a - b) / np.linalg.norm(a))
    ev = [json.loads((tmp_path / run / "eval" / "metrics.json").read_text()) for run in ("one", "two")]
    assert ev[1]["detections_count"] == ev[0]["detections_count"] and np.isclose(ev[1]["voc07_map"], ev[0]["voc07_map"], atol=0.02)
    # The work counters are every rank's, summed: the one process's counts.
    counters = [("features", "images_computed_now"), ("features", "crops_computed_now"), ("detect", "images_computed_now")]
    for stage, counter in counters:
        counts = [json.loads((tmp_path / run / stage / "metrics.json").read_text())[counter] for run in ("one", "two")]
        assert counts[1] == counts[0] > 0, (stage, counter, counts)

