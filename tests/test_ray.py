"""executor=ray: the per-image work as Ray tasks and actors on a local Ray instance gives a local run's entries,
survives a killed worker or actor, and stops on bad data with a local run's error."""

import json
import os
import shutil
import signal
import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

from rcnn.config import load_config
from rcnn.datasets import DatasetError
from rcnn.parallel import ExecutorError, process_images
from rcnn.run import main
from rcnn.store import StageStore

from .test_detect import TINY
from .test_shard import entries, same_entries

ray = pytest.importorskip("ray")

SETTINGS = SimpleNamespace(address="local", cpus_per_task=1.0, max_retries=3)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _square(i):
    return {"x": np.full(3, i * i)}


def _dies_once(marker_dir: str, i):
    """The worker computing image 3 kills itself the first time (as a lost node or an OOM kill would)."""
    marker = os.path.join(marker_dir, "died")
    if i == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"x": np.full(3, i * i), "pid": np.int64(os.getpid())}


def _bad_image(i):
    if i == 4:
        raise DatasetError(f"images/{i}.jpg: cannot decode the image (truncated file)")
    return {"x": np.full(3, i)}


def test_ray_tasks_fill_the_store(tmp_path, local_ray):
    ids = list(range(9))
    remote = StageStore(tmp_path, "ray", {})
    remote.put(0, _square(0))  # found in the store: not computed again
    assert process_images(remote, ids, _square, progress=False, ray=SETTINGS) == 8
    for i in ids:
        np.testing.assert_array_equal(remote.get(i)["x"], _square(i)["x"])
    assert process_images(remote, ids, _square, progress=False, ray=SETTINGS) == 0


def test_a_killed_ray_worker_is_retried_and_the_stage_completes(tmp_path, local_ray):
    store = StageStore(tmp_path, "ray", {})
    ids = list(range(8))
    assert process_images(store, ids, partial(_dies_once, str(tmp_path)), progress=False, ray=SETTINGS) == 8
    assert (tmp_path / "died").exists()  # the worker of image 3 was killed once
    for i in ids:
        np.testing.assert_array_equal(store.get(i)["x"], np.full(3, i * i))
    assert os.getpid() not in {int(store.get(i)["pid"]) for i in ids}  # computed by Ray's workers


def test_bad_data_in_a_ray_task_stops_the_stage_with_the_local_error(tmp_path, local_ray):
    store = StageStore(tmp_path, "ray", {})
    with pytest.raises(DatasetError) as err:
        process_images(store, list(range(8)), _bad_image, progress=False, ray=SETTINGS)
    assert str(err.value) == "images/4.jpg: cannot decode the image (truncated file)"
    assert 4 not in {i for i in range(8) if store.has(i)}


class _Faulty:
    """A dataset whose ``load_image`` of ``image``, in a Ray worker (not in this process), kills its process
    the first time (as a lost node or an OOM kill would: ``marker`` records it), or with ``marker=None``
    raises a DatasetError naming the image."""

    def __init__(self, ds, image, marker: str | None):
        self.ds, self.image, self.marker, self.driver = ds, image, marker, os.getpid()

    def __getattr__(self, name):
        if name.startswith("__") or name == "ds":  # (unpickling asks before ds is set)
            raise AttributeError(name)
        return getattr(self.ds, name)

    def load_image(self, image_id):
        if image_id == self.image and os.getpid() != self.driver:
            if self.marker is None:
                raise DatasetError(f"images/{image_id}.jpg: cannot decode the image (truncated file)")
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return self.ds.load_image(image_id)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny demo's chain through detect in this process, on one thread as each actor computes (torch's
    and the BLAS numpy calls: a matrix product split over threads rounds otherwise)."""
    import torch
    from threadpoolctl import threadpool_limits

    root = tmp_path_factory.mktemp("chain")
    args = [*TINY, f"dataset.root={root / 'demo'}", "proposals.method=ss", "svm.C=0.001"]  # (no choice of C)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            for stage in ("data", "detect"):
                assert main([*args, f"stage={stage}", f"out={root / 'local'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, args


def _features_with(monkeypatch, chain, image_index: int, marker):
    """The features stage on Ray actors whose dataset is :class:`_Faulty` at the train split's image
    ``image_index`` (the ground truth's features with it)."""
    import rcnn.datasets

    build = rcnn.datasets.build_dataset
    ds = build(load_config([*chain[1], "stage=features"]).dataset)
    image = ds.image_ids(ds.train_split)[image_index]
    monkeypatch.setattr(rcnn.datasets, "build_dataset", lambda cfg: _Faulty(build(cfg), image, marker))
    return image


def test_the_chain_with_executor_ray_equals_a_local_run_with_an_actor_killed(tmp_path, monkeypatch, local_ray, chain):
    """Data checks and selective search as Ray tasks, features and detect on Ray actors (two, of one CPU each,
    on this 2-CPU Ray; one per GPU on a cluster with GPUs), one features actor killed mid-stage: Ray restarts
    it and reruns its image, and every entry is the local run's."""
    root, args = chain
    out = tmp_path / "ray"
    for stage in ("data", "proposals"):
        assert main([*args, f"stage={stage}", f"out={out}", "executor=ray"]) == 0
    _features_with(monkeypatch, chain, 2, str(tmp_path / "killed"))
    assert main([*args, "stage=detect", f"out={out}", "executor=ray"]) == 0
    assert (tmp_path / "killed").exists()  # the actor loading that image was killed once
    for stage in ("data", "proposals", "features", "detect"):
        same_entries(entries(root / "local", stage), entries(out, stage))
    assert len(entries(out, "features")) == 6 + 4  # every image, and the train images' ground truth
    for stage, images in (("features", 6), ("detect", 2)):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["device"] == "ray: 2 actors (1 CPU each)" and metrics["images_computed_now"] == images


def test_bad_data_in_a_features_actor_stops_the_stage_with_the_local_error(tmp_path, monkeypatch, capsys, local_ray, chain):
    shutil.copytree(chain[0] / "local", tmp_path / "ray", ignore=shutil.ignore_patterns("features", "svm", "detect"))
    args = [*chain[1], f"out={tmp_path / 'ray'}", "executor=ray"]
    image = _features_with(monkeypatch, chain, 1, None)
    assert main([*args, "stage=features"]) == 1  # one line on stderr, as a local run's
    assert capsys.readouterr().err.strip().endswith(f"images/{image}.jpg: cannot decode the image (truncated file)")
    key = next(p for p in (tmp_path / "ray" / "features").iterdir() if p.is_dir()).name
    assert not StageStore.open(tmp_path / "ray", "features", key).has(image)


def test_without_ray_installed_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    store = StageStore(tmp_path, "ray", {})
    with pytest.raises(ExecutorError, match=r'pip install -e "\.\[ray\]"'):
        process_images(store, [1, 2], _square, progress=False, ray=SETTINGS)
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}", "stage=data", "executor=ray"]
    assert main(args) == 1  # one line on stderr, no traceback
    assert capsys.readouterr().err.strip().endswith('executor=ray needs Ray, an optional extra: pip install -e ".[ray]"')


def test_an_address_where_nothing_listens_fails_at_once(monkeypatch, tmp_path, capsys):
    """Ray's own retries take minutes to give up on a head that is not there: a closed port is a one-line
    error within seconds, through the command too."""
    import socket
    import time

    from rcnn.parallel import ray_init

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    start = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"nothing answers at ray.address=127.0.0.1:{port}"):
        ray_init(SimpleNamespace(address=f"127.0.0.1:{port}"), 1)
    assert time.perf_counter() - start < 10
    with pytest.raises(ExecutorError, match="not <host>:<port>, auto or local"):
        ray_init(SimpleNamespace(address="headnode"), 1)
    args = [*TINY, f"dataset.root={tmp_path / 'demo'}", f"out={tmp_path / 'run'}", "stage=data", "executor=ray",
            f"ray.address=ray://127.0.0.1:{port}"]  # fmt: skip
    assert main(args) == 1
    assert f"nothing answers at ray.address=ray://127.0.0.1:{port}" in capsys.readouterr().err
