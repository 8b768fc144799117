"""The stage registry: what each stage name runs, what ``all`` runs, and the run context."""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from . import distributed
from .config import Executor, ProposalMethod, Stage, num_workers
from .shard import check_training_stage
from .store import atomic_write

__all__ = ["RunContext", "run_stage", "STAGES", "PIPELINE"]

log = logging.getLogger("rcnn")


@dataclass
class RunContext:
    """What every stage gets: the resolved config, the run folder, the dataset (loaded once)."""

    cfg: DictConfig
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage run in this process
    results: dict[str, dict] = field(default_factory=dict)  # metrics per stage run in this process
    stack: list[str] = field(default_factory=list)  # the stages running now, outermost first
    peaks: list[float] = field(default_factory=list)  # their peak resident memory so far (MiB)
    built: dict[str, bool] = field(default_factory=dict)  # stages that computed here (not only read): resumed?
    recipe: list[dict] | None = None  # what the default route chose (auto=true), kept in each stage's metrics.json

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def workers(self) -> int:
        return num_workers(self.cfg)

    @property
    def ray(self):
        """The ``ray`` settings when the per-image CPU work runs as Ray tasks (``executor=ray``), else None."""
        return self.cfg.ray if self.cfg.executor == Executor.ray else None

    def building(self, store, resume: str | None = None) -> None:
        """Called by a stage that found no complete cache for this configuration, before it computes: says
        what is built now, for which stage, from where it resumes (``resume``, e.g. "40 of 128 images
        found"; by default, a training stage's ``checkpoint.pt`` in its key's folder), and how long its
        last build in this run folder took (``<out>/<stage>/last_build.json``)."""
        stage = store.stage
        check_training_stage(self.cfg, stage)  # a sharded run cannot build a model from every image
        if resume is None:
            resume = "from a checkpoint" if (store.dir / "checkpoint.pt").exists() else ""
        last = last_build_of(store.stage_dir)
        other = last is not None and last.key != store.key  # this folder last built the stage with other settings
        changes = identity_changes(last.manifest, store.identity) if other and last.manifest else []
        if other and self.cfg.image and self.stack[:1] == [Stage.detect.value] and not resume:
            raise unasked_training(self.cfg, store, changes)
        self.built[stage] = bool(resume)
        callers = [s for s in self.stack if s != stage]
        why = f" (needed by stage {callers[-1]})" if callers else ""
        log.info("stage %s is not built for this configuration%s: building it now%s (key %s). %s",
                 stage, why, f", resuming ({resume})" if resume else "", store.key,
                 last_build(store.stage_dir, last, changes))  # fmt: skip

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
    Stage.analyze.value: "eval.stage:run_analyze",  # (the command line turns it into eval with eval.analyze=true)
    Stage.benchmark.value: "eval.chain:run_benchmark",
}


def stage_function(stage: str) -> Callable[[RunContext], dict]:
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


# What `stage=all` runs, in order.
PIPELINE = ["data", "multibox", "proposals", "finetune", "features", "svm", "detect", "eval"]


def pipeline(cfg: DictConfig) -> list[str]:
    """The stages ``stage=all`` runs under ``cfg``, in order (the first, ``data``, checks every image; the
    other stages read the dataset without it)."""
    skip = set()
    if cfg.proposals.method == ProposalMethod.ss:
        skip.add(Stage.multibox.value)  # selective search alone needs no MultiBox model
    if not cfg.finetune.enabled:
        skip.add(Stage.finetune.value)  # features from the backbone's own weights (finetune.enabled=true to fine-tune)
    return [name for name in PIPELINE if name not in skip]


def needs_earlier_stages(cfg, stage: str) -> bool:
    """Whether ``stage`` works from the stages before it in this run folder: not an evaluation of a given
    ``detections`` file, nor detection in ``image=`` photos with a given ``detector`` or ``ensemble`` (a detector
    file makes its own proposals and features)."""
    if stage == Stage.eval.value and cfg.detections:
        return False
    return not (stage == Stage.detect.value and cfg.image and (cfg.detector or cfg.ensemble))


def run_stage(ctx: RunContext, stage: str) -> dict:
    """Run one stage (or the pipeline for ``all``); returns the last stage's metrics."""
    if stage == Stage.all.value:
        metrics = {}
        for name in pipeline(ctx.cfg):
            metrics = run_stage(ctx, name)
        return metrics
    chain = pipeline(ctx.cfg)
    if not ctx.stack and stage in chain and needs_earlier_stages(ctx.cfg, stage):
        never = [s for s in chain[1 : chain.index(stage)] if not (ctx.run_dir / s / "metrics.json").exists()]
        if never:
            log.info("%s holds no finished build of stage%s %s: stage %s builds %s first, as stage=all would",
                     ctx.run_dir, "s" * (len(never) > 1), ", ".join(never), stage, "them" if len(never) > 1 else "it")  # fmt: skip
    if stage in ctx.results:  # already run in this process (a later stage asked for its key)
        return ctx.results[stage]
    if distributed.active() and not ctx.stack and stage in chain and needs_earlier_stages(ctx.cfg, stage):
        for name in chain[: chain.index(stage)]:  # every rank takes part in each stage, in order
            run_stage(ctx, name)
    if distributed.active() and stage in distributed.RANK0_STAGES:
        return _rank0_builds(ctx, stage)
    fn = stage_function(stage)
    stage_dir = ctx.run_dir / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(ctx.cfg, resolve=True).encode()
    atomic_write(stage_dir / "config.yaml", lambda f: f.write(text))  # shards may write it at once
    if ctx.stack:  # a stage builds what it needs, as stage=all would have: say so
        log.info("stage %s -> %s (needed by stage %s)", stage, stage_dir, ctx.stack[-1])
    else:
        log.info("stage %s -> %s", stage, stage_dir)
    start, nested_before = time.perf_counter(), sum(ctx.timings.values())
    _carry_peak(ctx, peak_rss_mb())  # the outer stages' peak so far, before the counter restarts
    reset_peak_rss()
    ctx.stack.append(stage)
    ctx.peaks.append(0.0)
    try:
        metrics = fn(ctx)
    finally:
        ctx.stack.pop()
        peak = max(ctx.peaks.pop(), peak_rss_mb() or 0.0)
        _carry_peak(ctx, peak)
    nested = sum(ctx.timings.values()) - nested_before  # upstream stages this one ran first
    ctx.timings[stage] = time.perf_counter() - start - nested
    if stage in ctx.built and isinstance(metrics, dict):
        from .store import write_json

        write_json(stage_dir / "last_build.json", {
            "key": metrics.get("key"), "seconds": round(ctx.timings[stage], 1),
            "finished": time.strftime("%Y-%m-%d %H:%M"), "resumed": ctx.built[stage],
        })  # fmt: skip
    extra = {"peak_rss_mb": round(peak, 1)} if peak else {}
    if ctx.recipe is not None:
        extra["recipe"] = ctx.recipe
    if isinstance(metrics, dict) and extra:
        metrics = {**metrics, **extra}
        path = stage_dir / "metrics.json"
        if path.exists():
            from .store import write_json

            write_json(path, {**json.loads(path.read_text()), **extra})
    ctx.results[stage] = metrics
    return metrics


def _rank0_builds(ctx: RunContext, stage: str) -> dict:
    """Under torchrun, a stage that is not data-parallel: rank 0 runs it alone while the others wait,
    then they read it from the cache rank 0 wrote."""
    if distributed.rank() != 0:
        log.info("stage %s: rank 0 builds it; rank %d waits", stage, distributed.rank())
        distributed.barrier()
    with distributed.solo():
        metrics = run_stage(ctx, stage)
    if distributed.rank() == 0:
        distributed.barrier()
    return metrics


def found(store, ids: list) -> str:
    """``"40 of 128 images found"`` when some of ``ids`` have entries in ``store``, else ``""``."""
    n = len(ids) - len(store.missing(ids))
    return f"{n} of {len(ids)} images found" if n else ""


@dataclass(frozen=True)
class LastBuild:
    """A stage's last finished build in a run folder (``<out>/<stage>/last_build.json``): its key, when it
    finished, how long it took in words, and its key's manifest (None where that folder is gone)."""

    key: str
    finished: str
    took: str
    manifest: dict | None


def last_build_of(stage_dir: Path) -> LastBuild | None:
    try:
        b = json.loads((stage_dir / "last_build.json").read_text())
        key, finished, seconds = b["key"], b["finished"], float(b["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    took = (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min") + (
        " (this process's part of a resumed build)" if b.get("resumed") else "")  # fmt: skip
    try:
        manifest = json.loads((stage_dir / key / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    return LastBuild(key, finished, took, manifest)


def last_build(stage_dir: Path, last: LastBuild | None, changes: list[str]) -> str:
    """How long the stage's last build in this run folder took, in words, and what this one changes."""
    if last is None:
        return f"No build of it finished in {stage_dir.parent} before."
    said = f"Its last build in {stage_dir.parent} took {last.took}, finished {last.finished} (key {last.key})."
    return said + (f" This one differs in {_listed(changes)}." if changes else "")


def _listed(changes: list[str], most: int = 4) -> str:
    return "; ".join(changes[:most]) + (f" and {len(changes) - most} more" if len(changes) > most else "")


def unasked_training(cfg: DictConfig, store, changes: list[str]) -> Exception:
    """Detection in ``image=`` photos builds this configuration's detector when the run folder has none, but
    where the stage it needs was last built with other settings, the command most likely left out some of the
    training command's keys: this error says which, instead of training a new detector unasked."""
    from .detector_file import DetectorError

    why = f": this one differs in {_listed(changes)}" if changes else ""
    published = store.stage_dir.parent / "svm" / "detector.pt"
    use = f"detector={published} to run the detector that is there, or " if published.exists() else ""
    return DetectorError(
        f"stage=detect image={cfg.image}: the {store.stage} stage of this configuration's detector is not built in "
        f"{store.stage_dir.parent}, where its last build had other settings{why}. Give the keys of the command "
        f"that trained it, {use}stage=svm with these keys to train this one first"
    )


def identity_changes(before: dict, now: dict) -> list[str]:
    """What sets two builds of a stage apart, in words: each setting that differs (``a.b 64 -> 96``), the
    format version, and each earlier stage whose output it reads that is another build."""

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out

    old, new = flat(before.get("config")), flat(now.get("config"))
    changes = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)]  # fmt: skip
    if before.get("version") != now.get("version"):
        changes.append(f"its format (version {before.get('version')} -> {now.get('version')})")
    inputs_old, inputs_new = before.get("inputs") or {}, now.get("inputs") or {}
    changes += [f"the {s} stage's build it reads" for s in sorted(inputs_new) if inputs_old.get(s) != inputs_new[s]]
    return changes


def _carry_peak(ctx: RunContext, mb: float | None) -> None:
    """Every stage running now (the outer ones of a nested call) saw at least ``mb``."""
    ctx.peaks[:] = [max(p, mb or 0.0) for p in ctx.peaks]


def reset_peak_rss() -> None:
    """Restart this process's peak resident memory count (Linux; elsewhere the count is since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MiB) since the last :func:`reset_peak_rss` (worker processes
    not included); None where the system does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, since start
    except ImportError:  # pragma: no cover - Windows
        return None
