"""What the three training loops (pretraining, fine-tuning, MultiBox) share: the divergence check."""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["check_loss"]


def check_loss(loss: float, what: str, at: str, lr_key: str, lr: float, checkpoint: str | Path) -> None:
    """Stop a training whose loss is no longer finite, saying where, what to lower and what was kept:
    ``check_loss(rec["loss"], "fine-tuning", "iteration 12", "finetune.lr", 0.01, path)``. Called before the
    step's checkpoint would be written, so the kept checkpoint is the last good one."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{what} diverged at {at} (loss {loss}); lower {lr_key} (now {lr}). The last good checkpoint is kept in {checkpoint}"
        )
