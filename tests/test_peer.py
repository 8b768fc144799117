"""eval/peer.py: the Faster R-CNN bar runs end to end, is scored by the project's evaluator, and resumes."""

import json

from eval.peer import main

from .fakes import write_voc


def test_the_peer_trains_for_its_budget_is_evaluated_and_resumes(tmp_path, capsys):
    images = {f"im{k}": [("sign", 4 + k, 4, 30 + k, 30)] for k in range(4)}
    root = write_voc(tmp_path / "voc", images, {"train": ["im0", "im1", "im2"], "test": ["im3"]})
    args = ["dataset=voc", f"dataset.root={root}", "dataset.train_split=train", f"out={tmp_path / 'run'}",
            "minutes=0.02", "batch_size=1"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((tmp_path / "run" / "peer" / "metrics.json").read_text())
    assert m["steps"] >= 1 and m["train_seconds"] >= 0.02 * 60 and m["test_images"] == 1
    assert 0 <= m["voc07_map"] <= 1 and set(m["per_class_voc07"]) == {"sign"}
    assert (tmp_path / "run" / "peer" / "detections.json").exists()
    assert m["machine"]["gemm_gflops"]["fp32"] > 0
    capsys.readouterr()
    assert main(args) == 0  # the budget is spent: resumed, no step more
    assert "resuming at step" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "peer" / "metrics.json").read_text())["steps"] == m["steps"]
    assert main([*args, "lr=0.02"]) == 2  # another recipe: its checkpoint is not resumed
    assert "was trained with" in capsys.readouterr().err
    assert main([*args, "optimizer=adam"]) == 2
    assert main([*args, "dataset.root=/nonexistent"]) == 1
