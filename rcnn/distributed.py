"""torchrun: several processes (one per GPU, or CPU slots) taking part in one run.

Under ``torchrun`` (``WORLD_SIZE`` > 1), :func:`init` joins the process group (``nccl`` on CUDA, ``gloo``
on CPU) and every rank runs the same stages, in the chain's order:

* the per-image stages (data checks, proposals, features, detect) do their rank's shard of the images
  (:mod:`rcnn.shard`) and wait for each other at the end of the stage, so every rank goes on with every
  entry;
* fine-tuning is data-parallel (``DistributedDataParallel``): every rank draws the same global batch and
  computes its part of it, gradients are averaged, rank 0 writes the checkpoints and the model;
* the other stages that fit one model from every image (MultiBox, SVMs, pretraining) and the evaluation are
  built by rank 0 while the others wait, then read from its cache.

Without torchrun every function here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["init", "active", "solo", "rank", "world_size", "barrier", "all_sum", "close", "RANK0_STAGES", "TIMEOUT"]

# Stages rank 0 builds alone under torchrun (the rest wait for it): training stages that are not
# data-parallel, and the evaluation of the whole split.
RANK0_STAGES = ("pretrain", "multibox", "svm", "eval", "analyze", "benchmark")

# How long a rank waits for the others (a stage rank 0 builds alone can take hours on a large dataset).
TIMEOUT = datetime.timedelta(hours=24)


def launched() -> tuple[int, int] | None:
    """``(rank, world size)`` when started by torchrun (or another launcher setting its variables) with
    more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ["RANK"]), world) if world > 1 and "RANK" in os.environ else None


def init(device: str) -> bool:
    """Join torchrun's process group (once): ``nccl`` when ``device`` is CUDA, else ``gloo``; each rank
    takes the GPU of its ``LOCAL_RANK``. Returns whether this process is one of several."""
    if not launched():
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


_solo = False  # inside a stage rank 0 builds alone


def active() -> bool:
    """This process is one of several ranks of an initialised process group, working together (not
    inside :func:`solo`)."""
    return not _solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def in_solo() -> bool:
    return _solo


@contextmanager
def solo():
    """A stage one rank runs alone: inside, this process behaves as a single process (every image of a
    per-image stage, no waiting for the others)."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    """Wait for every rank (nothing without torchrun)."""
    if active():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (``t`` itself in one process)."""
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
