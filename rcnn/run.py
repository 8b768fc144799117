"""Entry point: ``python -m rcnn.run [stage=...] [dataset=...] [key=value ...]``.

Load config -> apply overrides -> seed -> dispatch. No argument runs the whole pipeline on the demo.
Exit codes: 0 done, 1 bad data, cache, detector or diverged training, 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import logging
import random
import sys

__all__ = ["main"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, load_config, usage

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage(argv))
        return 0
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from features.backbone import BackboneError, resolve_device
    from features.pretrain_data import PretrainDataError

    from . import distributed
    from .datasets import DatasetError
    from .detector import DetectorError
    from .parallel import ExecutorError
    from .shard import ShardError
    from .stages import RunContext, run_stage
    from .store import StoreError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dataset, recipe = None, None
    if cfg.auto and cfg.stage.value != "pretrain":  # the default route: choices from the device and the data
        from .datasets import build_dataset
        from .recipe import log_route, route

        try:
            dataset = build_dataset(cfg.dataset)
            chosen, recipe = route(cfg, argv, dataset)
            cfg = load_config(argv, defaults=chosen)
        except DatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log_route(recipe)
    seed_everything(cfg.seed)
    ctx = RunContext(cfg, recipe=recipe)
    if dataset is not None:
        ctx.dataset = dataset  # (the dataset settings are the same: the route sets none of them)
    try:
        if distributed.init(str(resolve_device(cfg.device.value))):
            logging.getLogger("rcnn").info("torchrun: rank %d of %d", distributed.rank(), distributed.world_size())
        run_stage(ctx, cfg.stage.value)
    except (DatasetError, StoreError, DetectorError, BackboneError, PretrainDataError, FileNotFoundError, FileExistsError,
            FloatingPointError, ShardError, ExecutorError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        distributed.close()
    if len(ctx.timings) > 1:
        print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in ctx.timings.items())
              + f"; total {sum(ctx.timings.values()):.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
