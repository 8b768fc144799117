import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rcnn import store as store_module
from rcnn.parallel import process_images
from rcnn.store import StageStore, StoreError, atomic_write, entry_name

REPO = Path(__file__).resolve().parents[1]


def test_put_get_round_trip(tmp_path):
    s = StageStore(tmp_path, "proposals", {"k": 50})
    s.put("img/1", {"boxes": np.arange(8, dtype=np.float32).reshape(2, 4), "n": np.int64(2)})
    assert s.has("img/1") and not s.has("img/2") and len(s) == 1
    got = s.get("img/1")
    np.testing.assert_array_equal(got["boxes"], np.arange(8).reshape(2, 4))
    assert got["boxes"].dtype == np.float32 and int(got["n"]) == 2
    with pytest.raises(KeyError, match="no proposals entry for image 'img/2'"):
        s.get("img/2")
    assert s.missing(["img/1", "img/2", 3]) == ["img/2", 3]


def test_entry_names_are_safe_file_names():
    assert entry_name(42) == "42" and entry_name("2008_000123") == "2008_000123"
    unsafe = entry_name("n01440764/n01440764_10026")
    assert "/" not in unsafe and unsafe.startswith("h-") and unsafe != entry_name("n01440764_n01440764_10026")


def test_key_changes_with_config_inputs_and_version(tmp_path):
    a = StageStore(tmp_path, "features", {"size": 224}, inputs={"proposals": "abc"})
    assert StageStore(tmp_path, "features", {"size": 224}, inputs={"proposals": "abc"}).key == a.key
    others = [
        StageStore(tmp_path, "features", {"size": 227}, inputs={"proposals": "abc"}),
        StageStore(tmp_path, "features", {"size": 224}, inputs={"proposals": "abd"}),
        StageStore(tmp_path, "features", {"size": 224}, inputs={"proposals": "abc"}, version=2),
    ]
    assert len({a.key, *(o.key for o in others)}) == 4
    a.put(1, {"x": np.zeros(1)})
    assert all(not o.has(1) for o in others)  # another config never sees these entries


def test_a_folder_from_another_config_is_refused(tmp_path):
    s = StageStore(tmp_path, "svm", {"C": 0.001})
    m = json.loads(s.manifest_path.read_text())
    m["config"]["C"] = 1.0
    s.manifest_path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="made under another configuration"):
        StageStore(tmp_path, "svm", {"C": 0.001})
    s.manifest_path.write_text("{truncated")
    with pytest.raises(StoreError, match="unreadable manifest"):
        StageStore(tmp_path, "svm", {"C": 0.001})


def test_entry_of_another_image_is_detected(tmp_path):
    s = StageStore(tmp_path, "data", {})
    s.put("a", {"x": np.zeros(1)})
    os.replace(s.path("a"), s.path("b"))
    with pytest.raises(StoreError, match="belongs to image 'a', not 'b'"):
        s.get("b")


@pytest.mark.parametrize("damage", ["cut", "garbled", "foreign"])
def test_a_damaged_entry_names_its_file_and_how_to_recompute_it(tmp_path, damage):
    s = StageStore(tmp_path, "features", {"k": 1})
    s.put("a", {"x": np.arange(1000, dtype=np.float32)})
    s.put_array("b", np.arange(1000, dtype=np.float32))
    for path in (s.path("a"), s.array_path("b")):
        data = path.read_bytes()
        if damage == "cut":  # a copy or a disk cut short
            path.write_bytes(data[: len(data) // 2])
        elif damage == "garbled":
            path.write_bytes(b"\x00" * len(data))
        elif path.suffix == ".npz":  # a valid archive that is not one of the store's entries
            np.savez(path.with_suffix(".tmp.npz"), x=np.zeros(3))
            os.replace(path.with_suffix(".tmp.npz"), path)
        else:
            path.write_bytes(data[:10])
    with pytest.raises(StoreError, match=r"a\.npz: unreadable features entry .*delete this file"):
        s.get("a")
    with pytest.raises(StoreError, match=r"b\.npy: unreadable features entry .*delete this file"):
        s.get_array("b")
    s.path("a").unlink()  # deleting it is enough: the entry is missing again, to be recomputed
    assert s.missing(["a", "b"]) == ["a"]


def test_finish_marks_complete_and_writes_metrics(tmp_path):
    s = StageStore(tmp_path, "data", {})
    assert not s.complete
    s.finish({"images": 3})
    assert s.complete
    assert json.loads((tmp_path / "data" / "metrics.json").read_text()) == {"images": 3}
    assert json.loads((s.dir / "metrics.json").read_text()) == {"images": 3}


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _dead_pid() -> int:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(dead.stdout)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    s = StageStore(tmp_path, "data", {})
    host = store_module.host_name()
    stale = s.entries_dir / f".x.npz.{host}.{_dead_pid()}.0123abcd.tmp"
    live = store_module.temporary_path(s.entries_dir / "y.npz")
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    StageStore(tmp_path, "data", {})
    assert not stale.exists() and live.exists()


def test_temporary_files_of_another_host_are_kept_until_old(tmp_path, monkeypatch):
    """Two hosts share a run folder (shards over NFS): host B cannot see host A's processes, so it leaves A's
    in-flight files alone, even where A's pid is dead on B or equal to one of B's; only an old file goes."""
    monkeypatch.setattr(store_module.socket, "gethostname", lambda: "host-a")
    s = StageStore(tmp_path, "data", {})
    a_writing = store_module.temporary_path(s.entries_dir / "x.npz")  # host A, this (live) pid
    a_other_pid = s.entries_dir / f".y.npz.host-a.{_dead_pid()}.00000001.tmp"
    a_old = s.entries_dir / f".z.npz.host-a.{_dead_pid()}.00000002.tmp"
    for p in (a_writing, a_other_pid, a_old):
        p.write_bytes(b"partial")
    long_ago = time.time() - store_module.STALE_TMP_SECONDS - 60
    os.utime(a_old, (long_ago, long_ago))
    assert "host-a" in a_writing.name and a_writing.name != store_module.temporary_path(s.entries_dir / "x.npz").name

    monkeypatch.setattr(store_module.socket, "gethostname", lambda: "host-b")
    StageStore(tmp_path, "data", {})  # host B opens the same store
    assert a_writing.exists() and a_other_pid.exists()  # A's pids mean nothing on B
    assert not a_old.exists()  # untouched for a day: stale whoever wrote it

    monkeypatch.setattr(store_module.socket, "gethostname", lambda: "host-a")
    StageStore(tmp_path, "data", {})  # host A itself sees its dead writer
    assert not a_other_pid.exists() and a_writing.exists()


def _square(i):
    return {"x": np.full(3, i * i)}


@pytest.mark.parametrize("workers", [1, 2])
def test_process_images_skips_finished_entries(tmp_path, workers):
    s = StageStore(tmp_path, "toy", {})
    s.put(2, {"x": np.full(3, -1)})  # already done: must not be recomputed
    assert process_images(s, list(range(6)), _square, workers=workers, progress=False) == 5
    assert [int(s.get(i)["x"][0]) for i in range(6)] == [0, 1, -1, 9, 16, 25]
    assert process_images(s, list(range(6)), _square, workers=workers, progress=False) == 0


SCRIPT = """
import sys, time
import numpy as np
from rcnn.parallel import process_images
from rcnn.store import StageStore

run_dir, log, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])

def work(i):
    with open(log, "a") as f:
        f.write(f"{i}\\n")
    time.sleep(0.05)
    return {"x": np.full(10_000, i, dtype=np.int64)}

if __name__ == "__main__":
    store = StageStore(run_dir, "toy", {"setting": 1})
    process_images(store, list(range(40)), work, workers=workers, progress=False)
    store.finish({"entries": len(store)})
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_run_resumes_where_it_stopped(tmp_path, workers):
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run_dir, log1, log2 = tmp_path / "run", tmp_path / "log1", tmp_path / "log2"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    entries = run_dir / "toy"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(log1), str(workers)], env=env, start_new_session=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(list(entries.glob("*/entries/*.npz"))) < 10:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, workers included
    proc.wait()
    done_before = {int(p.stem) for p in entries.glob("*/entries/*.npz")}
    assert 10 <= len(done_before) < 40, "the kill should land mid-stage"
    key_dir = next(entries.iterdir())
    assert not json.loads((key_dir / "manifest.json").read_text())["complete"]

    subprocess.run([sys.executable, str(script), str(run_dir), str(log2), str(workers)], env=env, check=True)
    recomputed = {int(x) for x in log2.read_text().split()}
    assert recomputed == set(range(40)) - done_before  # finished images were not redone
    store = StageStore(run_dir, "toy", {"setting": 1})
    assert store.complete and len(store) == 40
    for i in range(40):
        assert (store.get(i)["x"] == i).all()  # every entry whole and right
    assert not list(key_dir.rglob("*.tmp"))


def test_workers_of_a_killed_parent_exit_quietly(tmp_path):
    """Issue #15: kill -9 of the main process alone (as an OOM killer does) must not leave workers that
    finish their task and print BrokenPipeError tracebacks: they exit within a second, silently."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(SCRIPT.replace("time.sleep(0.05)", "time.sleep(2)")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "log"), "2"],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and len((tmp_path / "log").read_text().split() if (tmp_path / "log").exists() else []) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: the workers see it go
    start = time.time()
    err = proc.stderr.read()  # EOF once every worker holding the pipe has exited
    assert time.time() - start < 10, "workers outlived their parent"
    assert "Traceback" not in err and "BrokenPipeError" not in err and "leaked" not in err, err


CV_THEN_WORKERS = """
import sys, tempfile
import cv2, numpy as np
from rcnn.parallel import process_images
from rcnn.store import StageStore
from tests.test_store import _square

if __name__ == "__main__":
    img = np.random.randint(0, 255, (2000, 2000, 3), np.uint8)
    for _ in range(5):  # runs OpenCV's thread pool in this process
        cv2.resize(img, (300, 300), interpolation=cv2.INTER_AREA)
        cv2.cvtColor(img, cv2.COLOR_RGB2Lab)
    print(process_images(StageStore(tempfile.mkdtemp(), "toy", {}), list(range(4)), _square, workers=2, progress=False))
"""


def test_workers_start_cleanly_after_opencv_ran_its_threads(tmp_path):
    """Regression: forked workers deadlocked in cv2.setNumThreads once the parent had used OpenCV's pool."""
    script = tmp_path / "cv_then_workers.py"
    script.write_text(CV_THEN_WORKERS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr


def test_torch_save_streams_to_the_file_without_a_copy_in_memory(tmp_path):
    """Issue #27: an SVM checkpoint of every class's negatives was pickled into memory first (memory doubled)."""
    import tracemalloc

    import torch

    from rcnn.store import torch_save

    big = {"negatives": torch.zeros(25_000_000)}  # 100 MB
    tracemalloc.start()
    torch_save(tmp_path / "ck.pt", big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"{peak / 1e6:.0f} MB held while saving 100 MB"
    assert torch.equal(torch.load(tmp_path / "ck.pt", weights_only=True)["negatives"], big["negatives"])
