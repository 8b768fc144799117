"""Work in worker processes: per-image work over a split, written to a stage store as it arrives
(:func:`process_images`: this machine's processes, or Ray tasks on a cluster with ``executor=ray``), the
networks' per-image work on Ray actors (:func:`ray_actors`, :func:`on_actors`), and a pool for other
independent jobs (:func:`process_pool`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from .store import StageStore, pid_alive

__all__ = [
    "process_images", "process_pool", "ray_init", "ray_get", "ray_actors", "RayActors", "on_actors", "actor_device",
    "ExecutorError",
]  # fmt: skip


class ExecutorError(RuntimeError):
    """``executor=ray`` cannot run: Ray is not installed or its cluster cannot be reached."""


_FN = None  # the per-image function, set once in each worker (not pickled with every task)


def _init_worker(fn, parent: int) -> None:
    global _FN
    _FN = fn
    _single_threaded()
    _exit_with(parent)


def _exit_with(parent: int) -> None:
    """Exit quietly, at once, when the process that started this worker dies (a ``kill -9``): otherwise
    the worker finishes its task, then prints a ``BrokenPipeError`` traceback sending the result."""
    import threading
    import time

    def watch() -> None:
        while pid_alive(parent):
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _single_threaded() -> None:
    """One process per core already: keep each worker's libraries single-threaded."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - opencv is a dependency
        pass
    import torch

    torch.set_num_threads(1)


# After a kill -9 of this process, multiprocessing's resource tracker (a process of its own, started with
# this interpreter's -W options) removes the semaphores the pool left and warns about each "leak": the
# cleanup is its job, the warning only noise on the terminal of a user who stopped a run.
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


def _context():
    """Workers start from a clean server process, never by forking this one: a forked child of a
    process that has already run OpenCV's (or OpenMP's) thread pool deadlocks in ``cv2.setNumThreads``
    (seen: MultiBox's image resizing, then selective search workers). ``fn`` and its arguments are
    therefore pickled, once per worker."""
    if _QUIET_TRACKER not in sys.warnoptions:
        sys.warnoptions.append(_QUIET_TRACKER)  # read when the tracker starts, at the first pool
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _call(image_id):
    return image_id, _FN(image_id)


def process_images(
    store: StageStore,
    image_ids: Sequence,
    fn: Callable[[object], Mapping[str, np.ndarray]],
    *,
    workers: int = 1,
    progress: bool = True,
    desc: str | None = None,
    ray=None,
) -> int:
    """Compute ``fn(image_id)`` for every id that has no entry in ``store`` yet, and store it.

    Entries are written one by one in the calling process as results arrive, so a run that is
    killed keeps every finished image and a rerun computes only the rest. ``fn`` must be
    picklable (a module-level function or ``functools.partial`` of one) when ``workers > 1``, and a
    script that calls this with workers must guard its top level with ``if __name__ == "__main__":``.
    With ``ray`` (the config's ``ray`` section: ``executor=ray``) every image is a Ray task instead
    (:func:`_ray_images`).

    Returns the number of images computed now.
    """
    todo = store.missing(image_ids)
    total = len(image_ids)
    bar = tqdm(total=total, initial=total - len(todo), desc=desc or store.stage, unit="img", disable=not progress)
    try:
        if ray is not None and todo:
            _ray_images(store, todo, fn, bar, ray, workers)
        elif workers <= 1 or len(todo) <= 1:
            for image_id in todo:
                store.put(image_id, fn(image_id))
                bar.update()
        else:
            pool = _context().Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(fn, os.getpid()))
            with pool:
                for image_id, arrays in pool.imap_unordered(_call, todo, chunksize=1):
                    store.put(image_id, arrays)
                    bar.update()
    finally:
        bar.close()
    return len(todo)


def _ray_task(fn, image_id):
    _single_threaded()
    return image_id, fn(image_id)


def ray_init(settings, workers: int):
    """The ``ray`` module, connected: to ``settings.address`` (``auto`` or ``<host>:<port>``), or for
    ``local`` to a Ray instance started on this machine with ``workers`` CPUs; a Ray already initialised
    in this process (a test's, a notebook's) is used as it is."""
    try:
        import ray
    except ImportError:
        raise ExecutorError('executor=ray needs Ray, an optional extra: pip install -e ".[ray]"') from None
    if not ray.is_initialized():
        why = _unreachable(settings.address)
        if why:
            raise ExecutorError(f"executor=ray: nothing answers at ray.address={settings.address} ({why}); start the "
                                "head there (ray start --head) or give the address it printed")  # fmt: skip
        try:
            if settings.address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=settings.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ExecutorError(f"executor=ray: cannot start or join Ray at ray.address={settings.address}: {e}") from None
    return ray


def ray_get(ray, ref):
    """A Ray task's (or actor method's) result; an exception it raised is raised here as it was raised
    there (the error a local run gives), not wrapped in Ray's ``RayTaskError``."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, BaseException) else e) from None


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why a ``<host>:<port>`` (or ``ray://<host>:<port>``) address does not accept a connection within
    ``timeout`` seconds, or None (also for ``local`` and ``auto``, which Ray resolves itself). Ray's own
    connection retries take minutes to give up on an address where nothing listens."""
    import socket

    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return "not <host>:<port>, auto or local"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        return str(e) or type(e).__name__
    return None


def _ray_images(store: StageStore, todo: list, fn, bar, settings, workers: int) -> None:
    """Every image of ``todo`` as a Ray task asking for ``settings.cpus_per_task`` CPUs, written to
    ``store`` as results arrive (by the calling process: the run folder need not be shared with the
    workers). A task whose worker or node died runs again (``settings.max_retries``); one that raises on
    bad data cancels the rest and its error is raised here as a local run would raise it. At most about
    twice the cluster's task slots are submitted at a time."""
    ray = ray_init(settings, workers)
    task = ray.remote(_ray_task).options(num_cpus=settings.cpus_per_task, max_retries=settings.max_retries)
    fn_ref = ray.put(fn)  # sent once to the object store, not with every task
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / settings.cpus_per_task))
    queue, running = list(reversed(todo)), []
    try:
        while queue or running:
            while queue and len(running) < 2 * slots:
                running.append(task.remote(fn_ref, queue.pop()))
            done, running = ray.wait(running, num_returns=1)
            image_id, arrays = ray_get(ray, done[0])
            store.put(image_id, arrays)
            bar.update()
    finally:
        for ref in running:  # an error, an interrupt: stop what is still queued on the cluster
            ray.cancel(ref, force=True)


@dataclass
class RayActors:
    """Ray actors of one class (:func:`ray_actors`): their handles, the Ray module, what they are (for a
    stage's metrics), and the object-store references of their constructor's arguments, kept while they
    work so that a restarted actor finds them."""

    ray: object
    handles: list
    where: str
    args: list


def ray_actors(settings, workers: int, cls, *args) -> RayActors:
    """``cls`` as Ray actors, each built as ``cls(*args, threads=...)``: one per GPU when the cluster has
    GPUs (each asks for one), else one per ``settings.cpus_per_task`` CPUs (``threads`` is that number). The
    arguments go through Ray's object store once, not once per actor. An actor whose process or node dies
    is restarted and its task rerun, up to ``settings.max_retries`` times."""
    ray = ray_init(settings, workers)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), settings.cpus_per_task
    count = gpus or max(1, int(resources.get("CPU", 1) // cpus))
    options = {"num_gpus": 1} if gpus else {"num_cpus": cpus}
    actor_class = ray.remote(cls).options(**options, max_restarts=settings.max_retries,
                                          max_task_retries=settings.max_retries)  # fmt: skip
    refs = [ray.put(a) for a in args]
    handles = [actor_class.remote(*refs, threads=max(1, int(cpus))) for _ in range(count)]
    each = "1 GPU" if gpus else f"{cpus:g} CPU{'s' * (cpus != 1)}"
    return RayActors(ray, handles, f"ray: {count} actor{'s' * (count > 1)} ({each} each)", refs)


def on_actors(actors: RayActors, items: Sequence, submit: Callable, receive: Callable, per_actor: int = 2) -> None:
    """Every item through ``submit(actor, item)`` (which calls an actor method and returns its ref), with at
    most ``per_actor`` items queued on each actor; ``receive(result)`` on each result as it arrives, in this
    process. An error raised in an actor is raised here as it was raised there (:func:`ray_get`). The
    actors are killed at the end, whatever ends it (their queued work with them)."""
    ray = actors.ray
    queue, running = list(reversed(items)), {}
    try:
        while queue or running:
            for actor in actors.handles:
                while queue and sum(a is actor for a in running.values()) < per_actor:
                    running[submit(actor, queue.pop())] = actor
            done, _ = ray.wait(list(running), num_returns=1)
            running.pop(done[0])
            receive(ray_get(ray, done[0]))
    finally:
        for actor in actors.handles:
            ray.kill(actor)


def actor_device(threads: int):
    """An actor's device: the GPU Ray gave it (Ray sets ``CUDA_VISIBLE_DEVICES``), else the CPU with
    ``threads`` threads."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu")


def process_pool(workers: int):
    """A ``concurrent.futures`` pool of ``workers`` single-threaded processes (started as
    :func:`process_images`' are); jobs must be picklable."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=_context(), initializer=_pool_worker, initargs=(os.getpid(),))


def _pool_worker(parent: int) -> None:
    _single_threaded()
    _exit_with(parent)
