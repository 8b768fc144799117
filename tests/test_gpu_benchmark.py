"""The GPU benchmark script: every measurement runs at toy sizes on the CPU, and without a GPU the
default (``--device cuda``) writes a report that says so instead of failing."""

import json

import pytest
import torch

from features import gpu_benchmark


def test_every_measurement_runs_on_cpu(tmp_path):
    assert gpu_benchmark.main(["--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    for key in ("warp_network", "warp_image", "roi_image", "finetune", "pretrain", "identity"):
        assert r[key], key
    assert {x["batch"] for x in r["warp_network"]} == {4, 8}
    assert all(x["crops_per_second"] > 0 for x in r["warp_network"] + r["warp_image"] + r["roi_image"])
    assert [x["precision"] for x in r["pretrain"]][0] == "fp32"
    fp32 = next(x for x in r["identity"] if x["precision"] == "fp32")
    assert fp32["relative_l2_max"] == 0 and fp32["within"]  # the same computation twice on a CPU
    bf16 = next(x for x in r["identity"] if x["precision"] == "bf16")
    assert 0 < bf16["relative_l2_max"] < bf16["tolerance"]
    assert "torchrun" in (tmp_path / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_report_says_so(tmp_path):
    assert gpu_benchmark.main(["--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["gpu"] is None and "sees no CUDA device" in r["reason"]
    assert "No GPU" in (tmp_path / "gpu.md").read_text()
