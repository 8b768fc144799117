import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rcnn.run import main

from .fakes import write_voc

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "datasets" / "coco128"


def run(*args):
    return main(["progress=false", *args])


def test_data_stage_on_a_voc_tree(tmp_path, capsys, caplog):
    root, out = write_voc(tmp_path / "voc"), tmp_path / "run"
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}") == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "split images boxes classes difficult trainval 2 3 2 1 test 2 2 2 1" in printed
    m = json.loads((out / "data" / "metrics.json").read_text())
    assert m["splits"]["trainval"]["images"] == 2 and m["splits"]["trainval"]["boxes"] == 3
    assert m["splits"]["test"] == {**m["splits"]["test"], "images": 2, "boxes": 2, "classes": 2}
    assert m["num_classes"] == 2 and m["images_checked_now"] == 3
    saved = yaml.safe_load((out / "data" / "config.yaml").read_text())
    assert saved["dataset"]["root"] == str(root) and saved["stage"] == "data"
    key_dir = out / "data" / m["key"]
    assert json.loads((key_dir / "manifest.json").read_text())["complete"]

    # A rerun finds every image done; another setting gets a new key and folder.
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}") == 0
    assert json.loads((out / "data" / "metrics.json").read_text())["images_checked_now"] == 0
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}", "dataset.classes=[dog,cat]") == 0
    m2 = json.loads((out / "data" / "metrics.json").read_text())
    assert m2["key"] != m["key"] and m2["images_checked_now"] == 3
    # the log says why it built again: what differs from the last build in this folder
    caplog.set_level(logging.INFO, logger="rcnn")
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}", "dataset.classes=[cat,dog]") == 0
    assert f'(key {m2["key"]}). This one differs in dataset.classes ["dog", "cat"] -> ["cat", "dog"]; fingerprint "' in caplog.text


def test_data_stage_warns_of_a_class_without_training_boxes(tmp_path, caplog):
    root, out = write_voc(tmp_path / "voc", splits={"train": ["img2", "img3"], "test": ["img1"]}), tmp_path / "run"
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}") == 0  # cat only in img1
    m = json.loads((out / "data" / "metrics.json").read_text())
    assert m["classes_without_training_boxes"] == ["cat"]
    assert "cat: no box in the train split 'train': the detector cannot learn it" in caplog.text


def test_changed_annotation_invalidates_the_cache(tmp_path):
    root, out = write_voc(tmp_path / "voc"), tmp_path / "run"
    args = ("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}")
    assert run(*args) == 0
    key = json.loads((out / "data" / "metrics.json").read_text())["key"]
    xml = root / "Annotations" / "img2.xml"
    xml.write_text(xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>"))
    assert run(*args) == 0
    assert json.loads((out / "data" / "metrics.json").read_text())["key"] != key


def test_bad_image_fails_naming_it_and_keeps_finished_work(tmp_path, capsys):
    root, out = write_voc(tmp_path / "voc"), tmp_path / "run"
    (root / "JPEGImages" / "img2.jpg").write_bytes(b"garbage")
    assert run("stage=data", "dataset=voc", f"dataset.root={root}", f"out={out}", "workers=1") == 1
    assert "img2.jpg: unreadable image" in capsys.readouterr().err
    assert len(list((out / "data").glob("*/entries/img1.npz"))) == 1  # done before the failure, kept


def test_config_errors_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("stage=detekt", f"out={out}") == 2
    assert "Valid stages: data, pretrain, proposals" in capsys.readouterr().err
    assert run("dataset.limit=many", f"out={out}") == 2
    assert run("dataset.classes=[cat,dog", f"out={out}") == 2  # Hydra's parse error: one line, no traceback
    err = capsys.readouterr().err
    assert "cannot parse 'dataset.classes=[cat,dog'" in err and "Traceback" not in err and err.count("\n") == 2
    assert not out.exists()


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "stage=<data|pretrain|proposals" in out
    # Issue #15: the defaults, not the demo recipe's values, each with its comment; the recipe apart.
    assert "  input_size: 224  # warped crop size (GoogLeNet's input)" in out
    assert "  enabled: false  # stage=all fine-tunes first" in out
    assert "recipe, applied before your overrides (dataset.recipe=[] drops it):\n  proposals.method=ss proposals.top_n=200" in out
    assert main(["--help", "dataset=coco128"]) == 0
    assert "root: ../shared/datasets/coco128" in capsys.readouterr().out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "rcnn.run", "stage=nope"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown stage 'nope'" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not COCO128.exists(), reason="needs ../shared/datasets/coco128")
def test_coco128_counts(tmp_path, capsys):
    assert run("stage=data", "dataset=coco128", f"dataset.root={COCO128}", f"out={tmp_path}") == 0
    m = json.loads((tmp_path / "data" / "metrics.json").read_text())
    assert (m["splits"]["train2017"]["images"], m["splits"]["train2017"]["boxes"]) == (128, 929)
    assert (m["splits"]["val2017"]["images"], m["splits"]["val2017"]["boxes"]) == (128, 898)
    assert m["num_classes"] == 80 and m["boxes_dropped"] == 0


def test_every_stage_has_an_importable_entry_point():
    from rcnn.config import Stage
    from rcnn.stages import stage_function

    assert all(callable(stage_function(s.value)) for s in Stage if s is not Stage.all)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


_STARTS: dict[int, float] = {}  # resident MiB when each allocating stage began


def _allocating(mb):
    def stage(ctx):
        import mmap

        _STARTS[mb] = _rss_mb()
        # Fresh pages of an anonymous mapping, held while the stage runs (malloc could hand back freed heap
        # that is still resident in a long test process, and the resident size would not grow).
        block = np.frombuffer(mmap.mmap(-1, max(mb, 1) * 2**20), np.uint8) if mb else np.zeros(1)
        block[::4096] = 1  # touch every page
        if mb == 200:
            from rcnn.stages import run_stage

            run_stage(ctx, "data")  # a nested stage, smaller than this one
        return {"sum": float(block[:1].sum())}

    return stage


def test_peak_memory_is_measured_per_stage_nested_stages_included(tmp_path, monkeypatch):
    """Issue #12: each stage's peak resident memory; an outer stage's includes what its nested ones used."""
    from rcnn import stages
    from rcnn.config import load_config

    if stages.peak_rss_mb() is None:
        pytest.skip("this system does not report peak memory")
    fns = {"eval": _allocating(0), "data": _allocating(50), "proposals": _allocating(200)}
    monkeypatch.setattr(stages, "stage_function", lambda name: fns[name])
    cfg = load_config([f"out={tmp_path}"])
    ctx = stages.RunContext(cfg)
    stages.run_stage(ctx, "eval")
    peak = stages.run_stage(ctx, "proposals")["peak_rss_mb"]  # 200 MiB held around a nested 50 MiB stage
    nested = ctx.results["data"]["peak_rss_mb"]
    after = stages.run_stage(stages.RunContext(cfg), "eval")["peak_rss_mb"]  # the count restarts per stage
    # Against the resident memory when the stage began (not another stage's peak: a long test session's
    # process can give memory back between two stages).
    assert nested <= peak and peak >= _STARTS[200] + 190 and after <= peak - 150


def _stage_with_store(name, needs=None, crash_after_one=False):
    def stage(ctx):
        from rcnn import stages
        from rcnn.store import StageStore

        if needs:
            stages.run_stage(ctx, needs)
        store = StageStore(ctx.run_dir, name, {"seed": ctx.cfg.seed})
        if not store.complete:
            ctx.building(store, stages.found(store, ["a", "b"]))
            for image_id in store.missing(["a", "b"]):
                store.put(image_id, {"x": np.zeros(1)})
                if crash_after_one:
                    raise KeyboardInterrupt
            store.finish({"key": store.key})
        return {"key": store.key}

    return stage


def test_a_stage_says_which_upstream_stages_it_builds_and_how_long_they_took_last_time(tmp_path, monkeypatch, caplog):
    """Issue #15 (3): missing upstream stages are announced at the start, each build says why it runs,
    whether it resumes, and how long the last build in the run folder took."""
    import logging

    from rcnn import stages
    from rcnn.config import load_config

    fns = {"proposals": _stage_with_store("proposals"), "features": _stage_with_store("features", needs="proposals")}
    monkeypatch.setattr(stages, "stage_function", lambda name: fns[name])
    caplog.set_level(logging.INFO, logger="rcnn")

    def run_features(*overrides):
        caplog.clear()
        cfg = load_config([f"out={tmp_path}", "proposals.method=ss", "finetune.enabled=false", *overrides])
        stages.run_stage(stages.RunContext(cfg), "features")
        return " ".join(caplog.messages)

    said = run_features()
    assert f"{tmp_path} holds no finished build of stage proposals: stage features builds it first, as stage=all would" in said
    assert "stage proposals is not built for this configuration (needed by stage features): building it now" in said
    assert "stage features is not built for this configuration: building it now" in said
    assert "No build of it finished in" in said
    first = json.loads((tmp_path / "proposals" / "last_build.json").read_text())
    assert first["seconds"] >= 0 and not first["resumed"]

    said = run_features()  # everything cached: nothing is built, nothing said about builds
    assert "not built" not in said and "holds no finished build" not in said

    fns["proposals"] = _stage_with_store("proposals", crash_after_one=True)
    with pytest.raises(KeyboardInterrupt):
        run_features("seed=1")
    fns["proposals"] = _stage_with_store("proposals")
    said = run_features("seed=1")  # a new configuration, resumed after the interruption
    assert "stage proposals is not built for this configuration (needed by stage features): building it now, " \
           "resuming (1 of 2 images found)" in said  # fmt: skip
    assert f"Its last build in {tmp_path} took 0 s, finished" in said and f"(key {first['key']})" in said
    assert json.loads((tmp_path / "proposals" / "last_build.json").read_text())["resumed"]


def test_a_given_detector_on_photos_and_given_detections_need_no_earlier_stages():
    """Their stage neither builds nor announces the stages before it (a detector file makes its own proposals
    and features); detection on the test split, or with the run's own detector, does."""
    from rcnn.config import load_config
    from rcnn.stages import needs_earlier_stages

    def needs(stage, *overrides):
        return needs_earlier_stages(load_config(list(overrides)), stage)

    assert needs("detect") and needs("detect", "image=a.jpg") and needs("detect", "detector=d.pt")
    assert not needs("detect", "image=a.jpg", "detector=d.pt") and not needs("detect", "image=a.jpg", "ensemble=[a.pt,b.pt]")
    assert needs("eval") and not needs("eval", "detections=dets.json")


def test_identity_changes_name_settings_format_and_inputs():
    from rcnn.stages import identity_changes

    before = {"version": 3, "config": {"features": {"input_size": 64, "mode": "warp"}}, "inputs": {"proposals": "a", "finetune": "b"}}
    now = {"version": 4, "config": {"features": {"input_size": 96, "mode": "warp"}, "seed": 1},
           "inputs": {"proposals": "a", "finetune": "c"}}  # fmt: skip
    assert identity_changes(before, now) == [
        "features.input_size 64 -> 96", "seed null -> 1", "its format (version 3 -> 4)", "the finetune stage's build it reads",
    ]  # fmt: skip
    assert identity_changes(now, now) == []
