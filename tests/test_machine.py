"""rcnn.machine: native bfloat16 only (emulated bf16 is slower than fp32), the GEMM rate."""

import torch

from features.backbone import amp_dtype
from rcnn import machine


def _cpu(monkeypatch, flags: set[str], onednn_says: bool = True):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_says)


def test_auto_precision_on_a_cpu_takes_bf16_only_where_it_is_native(monkeypatch):
    # An AVX512 CPU without AVX512-BF16: oneDNN says it supports bf16 (by emulation, ~3x slower than fp32).
    _cpu(monkeypatch, {"avx2", "avx512f", "avx512_vnni"})
    assert not machine.native_bf16("cpu")
    assert amp_dtype("auto", torch.device("cpu")) is None
    _cpu(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
    assert amp_dtype("auto", torch.device("cpu")) is torch.bfloat16
    _cpu(monkeypatch, {"avx2", "amx_bf16", "amx_tile"})
    assert amp_dtype("auto", torch.device("cpu")) is torch.bfloat16
    _cpu(monkeypatch, {"avx2", "fma"}, onednn_says=False)
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # asked for by name: given, emulated or not


def test_auto_precision_on_a_gpu_does_not_count_emulated_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # A T4 or V100: torch counts emulated bf16 unless asked not to.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_gemm_rates_skip_emulated_bf16(monkeypatch):
    _cpu(monkeypatch, {"avx512f"})
    rates = machine.gemm_rates()
    assert rates["fp32"] > 0 and rates["bf16"] is None


def test_gemm_rate_is_the_fastest_product_not_a_busy_moments(monkeypatch):
    """A neighbour or a clock dip only slows a product: the rate is the fastest of the repeats (a ceiling), so
    one slow product, or two, do not lower it (a median of three would read 2x low here)."""
    durations = iter([0.1, 0.2, 0.2, 0.05])  # the products' seconds, in turn
    clock = {"now": 0.0, "start": True}

    def perf_counter():
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(machine.time, "perf_counter", perf_counter)
    rates = machine.gemm_rates(bf16=False, repeats=4)
    assert rates == {"fp32": round(2 * 2048**3 / 0.05 / 1e9, 1), "bf16": None}
