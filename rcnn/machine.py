"""Facts about the machine the figures are computed on: its CPU, whether it computes bfloat16 natively,
its matrix-multiply rate, and a description for reports.

Native bfloat16 is read from the CPU's flags (``avx512_bf16``, ``amx_bf16``) and, on a GPU, from torch with
emulation excluded: oneDNN and ``torch.cuda.is_bf16_supported()`` also answer yes where bf16 is emulated
(an AVX512 CPU without AVX512-BF16, a T4 or V100), where it is several times slower than fp32.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

__all__ = ["cpu_flags", "cpu_model", "native_bf16", "gemm_rates", "describe", "cores"]

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bfloat16 arithmetic


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` (cpu | cuda) computes bfloat16 in hardware, not by emulation."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in BF16_CPU_FLAGS)
    return platform.machine() == "arm64" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # no /proc: macOS


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gemm_rates(bf16: bool | None = None, repeats: int = 5) -> dict:
    """This machine's CPU matrix-multiply rate (GFLOP/s) in fp32 and bf16, measured now: the fastest of
    ``repeats`` 2048^3 products, a ceiling (a neighbour or a clock dip only ever slows a product, so a median
    of a few reads low at a busy moment and a fraction of it can pass 100%). bf16 only where the CPU computes
    it natively unless ``bf16=True`` (elsewhere it is emulated and slow): None in its place."""
    import torch

    if bf16 is None:
        bf16 = native_bf16("cpu")
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and not bf16:
            out[name] = None
            continue
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[name] = round(2 * 2048**3 / best / 1e9, 1)
    return out


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def describe() -> dict:
    """What the figures were measured on (the GEMM rate measured now)."""
    import torch
    import torchvision

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(), "cores": cores(), "memory_gib": _memory_gib(), "gpu": gpu,
        "native_bf16": native_bf16("cpu"), "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "gemm_gflops": gemm_rates(),
    }  # fmt: skip
