"""The stage registry: what each stage name runs, what ``all`` runs, and the run context."""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from .config import ProposalMethod, Stage, num_workers

__all__ = ["RunContext", "run_stage", "STAGES", "PIPELINE"]

log = logging.getLogger("rcnn")


@dataclass
class RunContext:
    """What every stage gets: the resolved config, the run folder, the dataset (loaded once)."""

    cfg: DictConfig
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage run in this process
    results: dict[str, dict] = field(default_factory=dict)  # metrics per stage run in this process
    stack: list[str] = field(default_factory=list)  # the stages running now, outermost first

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def workers(self) -> int:
        return num_workers(self.cfg)

    @cached_property
    def dataset(self):
        from .datasets import build_dataset

        return build_dataset(self.cfg.dataset)


# Each stage's entry point, ``module:function`` taking the RunContext and returning its metrics;
# imported when the stage runs, so that a stage's dependencies load only when needed.
STAGES: dict[str, str] = {
    Stage.data.value: "rcnn.datasets.stage:run",
    Stage.pretrain.value: "features.pretrain:run_pretrain",
    Stage.proposals.value: "proposals.stage:run_proposals",
    Stage.multibox.value: "proposals.stage:run_multibox",
    Stage.finetune.value: "features.stage:run_finetune",
    Stage.features.value: "features.stage:run_features",
    Stage.svm.value: "svm.stage:run_svm",
    Stage.detect.value: "rcnn.detect:run_detect",
    Stage.eval.value: "eval.stage:run_eval",
    Stage.benchmark.value: "eval.chain:run_benchmark",
}


def stage_function(stage: str) -> Callable[[RunContext], dict]:
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


# What `stage=all` runs, in order.
PIPELINE = ["data", "multibox", "proposals", "finetune", "features", "svm", "detect", "eval"]


def run_stage(ctx: RunContext, stage: str) -> dict:
    """Run one stage (or the pipeline for ``all``); returns the last stage's metrics."""
    if stage == Stage.all.value:
        metrics = {}
        for name in PIPELINE:
            if name == Stage.multibox.value and ctx.cfg.proposals.method == ProposalMethod.ss:
                continue  # selective search alone needs no MultiBox model
            if name == Stage.finetune.value and not ctx.cfg.finetune.enabled:
                continue  # features from the backbone's own weights (finetune.enabled=true to fine-tune)
            metrics = run_stage(ctx, name)
        return metrics
    if stage in ctx.results:  # already run in this process (a later stage asked for its key)
        return ctx.results[stage]
    fn = stage_function(stage)
    stage_dir = ctx.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(ctx.cfg, resolve=True))
    if ctx.stack:  # a stage builds what it needs, as stage=all would have: say so
        log.info("stage %s -> %s (needed by stage %s: read from the cache if this configuration built it, "
                 "else built now)", stage, stage_dir, ctx.stack[-1])  # fmt: skip
    else:
        log.info("stage %s -> %s", stage, stage_dir)
    start, nested_before = time.perf_counter(), sum(ctx.timings.values())
    ctx.stack.append(stage)
    try:
        metrics = fn(ctx)
    finally:
        ctx.stack.pop()
    nested = sum(ctx.timings.values()) - nested_before  # upstream stages this one ran first
    ctx.timings[stage] = time.perf_counter() - start - nested
    ctx.results[stage] = metrics
    return metrics
