"""Sharding the per-image stages: ``shard=I/N`` (or torchrun's ``RANK``/``WORLD_SIZE``).

The per-image stages (data, proposals, features, detect) compute only the images of their shard: every
N-th image of each split, from the I-th (0-based), in the split's order. Each writes its entries into
the same stage store (keyed as an unsharded run's, entry by entry atomic), so the shards can run at once,
on one machine or on several that share the run folder. A shard that finds entries still missing when it
is done stops there and says so; the last shard to finish (or any later run, sharded or not) finds every
entry and writes the stage's metrics: the result is the single-process run's, entry for entry.

The training stages (MultiBox, fine-tuning, SVMs, pretraining) fit one model from every image: a sharded
run needs them built (a run without ``shard=`` builds them) and says which when they are not.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

__all__ = ["parse_shard", "current_shard", "mine", "pending", "check_training_stage", "TRAINING_STAGES", "ShardError"]

log = logging.getLogger("rcnn")

TRAINING_STAGES = ("pretrain", "multibox", "finetune", "svm")


class ShardError(RuntimeError):
    """A sharded run that cannot go on (a training stage not built): the message says what to run."""


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; None -> None. Raises ValueError with the rule."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not m or not (0 <= int(m.group(1)) < int(m.group(2))):
        raise ValueError(f"shard must be I/N with 0 <= I < N (shards are numbered from 0, as torchrun's ranks), got {value!r}")
    return int(m.group(1)), int(m.group(2))


def current_shard(cfg) -> tuple[int, int] | None:
    """This process's shard: ``shard=`` when set, else torchrun's rank and world size when there are
    several processes, else None (every image)."""
    if cfg.get("shard") is not None:
        return parse_shard(cfg.shard)
    from . import distributed

    return None if distributed.in_solo() else distributed.launched()


def mine(cfg, ids: Sequence) -> list:
    """The ids of this process's shard (all of them when unsharded), in their order."""
    s = current_shard(cfg)
    return list(ids) if s is None else list(ids)[s[0] :: s[1]]


def pending(cfg, store, ids: Sequence, stage: str) -> dict | None:
    """After this shard's images: None when ``store`` holds every id (go on and write the stage's
    metrics), else the shard's report ``{"stage", "key", "shard", "images", "images_found",
    "complete": False}`` (logged). Under torchrun the ranks wait for each other here first."""
    from . import distributed

    distributed.barrier()
    missing = store.missing(list(ids))
    if not missing:
        return None
    i, n = current_shard(cfg) or (0, 1)
    found = len(ids) - len(missing)
    log.info("stage %s, shard %d/%d: its images are done; %d of %d images of the stage are in %s. The last shard "
             "to finish (or a run without shard=) writes the stage's metrics.", stage, i, n, found, len(ids), store.dir)  # fmt: skip
    return {"stage": stage, "key": store.key, "shard": f"{i}/{n}", "images": len(ids), "images_found": found,
            "complete": False}  # fmt: skip


def check_training_stage(cfg, stage: str) -> None:
    """A sharded run reaching a training stage that is not built: raise :class:`ShardError` saying how to
    build it. (Under torchrun the ranks build them together or leave them to rank 0: rcnn.distributed.)"""
    from . import distributed

    if distributed.active() or distributed.in_solo():
        return
    shard = current_shard(cfg) if stage in TRAINING_STAGES else None
    if shard is not None:
        i, n = shard
        raise ShardError(
            f"stage {stage} trains one model from every image and is not built for this configuration; a sharded "
            f"run (shard {i}/{n}) cannot build it. Build it once without shard= (python -m rcnn.run stage={stage} "
            "and the same overrides), then start the shards."
        )
