"""Several ranks of one run, forked from the test's process: torchrun's environment without its launcher
(the forked ranks start at once instead of importing torch again; ``tests/test_shard.py`` runs torchrun
itself)."""

import multiprocessing as mp
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip
    import torch

    torch.set_num_threads(1)
    code = fn(*args)
    os._exit(code if isinstance(code, int) else 0)


def run_ranks(fn, *args, world: int = 2, timeout: float = 600) -> list:
    """``fn(*args)`` in ``world`` forked processes with torchrun's variables set (one thread each); their
    exit codes (``fn``'s return value when it is an int)."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
