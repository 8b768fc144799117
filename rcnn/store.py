"""The stage store: per-image outputs of one stage under one configuration.

Layout of a run folder (``out=``)::

    <out>/<stage>/metrics.json              the latest run of the stage (a copy of its key's)
    <out>/<stage>/config.yaml               the resolved configuration of that run
    <out>/<stage>/<key>/manifest.json       what shaped the entries: stage, format version,
                                            config subset, upstream keys; "complete" when done
    <out>/<stage>/<key>/entries/<id>.npz    one entry per image id: a dict of numpy arrays
    <out>/<stage>/<key>/metrics.json        the metrics of the run that completed this key

``key`` is a hash of the stage name, its format version, the config keys that shaped its outputs
and the keys of the upstream stages it read. A new setting anywhere upstream therefore gives a new
key and a fresh folder: a cache made under another configuration is never reused. Every file is
written atomically (temporary file + ``os.replace``), so a killed run leaves only whole entries,
and a rerun skips them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import socket
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

__all__ = [
    "StageStore", "StoreError", "atomic_write", "write_json", "torch_save", "config_hash", "entry_name", "temporary_path",
]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")
# A temporary file: ".<name>.<host>.<pid>.<token>.tmp". Shards on several machines may share a run folder
# (NFS) and containers repeat pids: the host and a random token keep two writers' files apart, and only this
# host can tell whether one of its writers died.
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")
_OLD_TMP = re.compile(r"^\..+\.tmp$")  # any other temporary name (an older release's ".<name>.<pid>.tmp")
STALE_TMP_SECONDS = 24 * 3600  # a temporary file untouched this long is stale whoever wrote it


class StoreError(RuntimeError):
    """A stage folder that does not match what is asked of it."""


# what reading a damaged .npy / .npz raises: a short or garbled header (ValueError, EOFError), a broken zip
# (BadZipFile, zlib.error, OSError), an entry without its image id (KeyError)
_UNREADABLE = (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, zlib.error)


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def host_name() -> str:
    """This machine's name as it appears in temporary file names (letters, digits and dashes)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def temporary_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` that no other writer, on this host or another, will use."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_name()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file left by a writer that is gone: one of this host whose process
    is dead, or any (another host's, an older release's) untouched for ``STALE_TMP_SECONDS``."""
    m = _TMP.match(path.name)
    if m is None and not _OLD_TMP.match(path.name):
        return False
    if m is not None and m["host"] == host_name() and not pid_alive(int(m["pid"])):
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_TMP_SECONDS


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync it, then rename it.

    Readers see the old file or the whole new one, never a part; on error the old file stays.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` with ``torch.save`` (checkpoints, models), streamed into the temporary file:
    no copy of it is held in memory (an SVM checkpoint of every class's negatives would double it)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def entry_name(image_id) -> str:
    """File stem for an image id: the id itself when it is a safe file name, else a hash of it."""
    text = str(image_id)
    if _SAFE_NAME.match(text):
        return text
    return "h-" + hashlib.sha1(text.encode()).hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class StageStore:
    """Per-image entries of one stage under one configuration key.

    Args:
        run_dir: the run folder (``cfg.out``).
        stage: stage name, e.g. ``"proposals"``.
        config: the (JSON-able) config keys that shape this stage's entries.
        inputs: ``{upstream stage: its key}`` for every stage whose entries this one reads.
        version: the entries' format version; bump it when their layout changes.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        stage: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
        version: int = 1,
    ):
        self.stage = stage
        self.identity = {
            "stage": stage,
            "version": int(version),
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "inputs": dict(sorted((inputs or {}).items())),
        }
        self.key = config_hash(self.identity)
        self.stage_dir = Path(run_dir) / stage
        self.dir = self.stage_dir / self.key
        self.entries_dir = self.dir / "entries"
        self.manifest_path = self.dir / "manifest.json"
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        self._check_manifest()
        self._remove_stale_tmp()

    # -- manifest -----------------------------------------------------------------------------

    def _check_manifest(self) -> None:
        if not self.manifest_path.exists():
            write_json(self.manifest_path, {**self.identity, "key": self.key, "complete": False})
            return
        try:
            found = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{self.manifest_path}: unreadable manifest ({e}); delete {self.dir} to rebuild") from e
        mine = {k: found.get(k) for k in self.identity}
        if mine != self.identity:
            raise StoreError(
                f"{self.dir} holds entries made under another configuration "
                f"(manifest differs from this run's); refusing to reuse it. Delete the folder to rebuild."
            )

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def finish(self, metrics: Mapping[str, Any]) -> None:
        """Mark the key complete and write its metrics (also as the stage's latest metrics)."""
        write_json(self.dir / "metrics.json", metrics)
        write_json(self.stage_dir / "metrics.json", metrics)
        write_json(self.manifest_path, {**self.manifest, "complete": True})

    def _remove_stale_tmp(self) -> None:
        """Temporary files left by a killed writer are removed (:func:`is_stale_temporary`): another host's
        only when old, since this host cannot see that host's processes."""
        for folder in (self.dir, self.entries_dir):
            for p in folder.iterdir():
                if is_stale_temporary(p):
                    p.unlink(missing_ok=True)

    # -- entries ------------------------------------------------------------------------------

    def path(self, image_id) -> Path:
        return self.entries_dir / f"{entry_name(image_id)}.npz"

    def array_path(self, image_id) -> Path:
        return self.entries_dir / f"{entry_name(image_id)}.npy"

    def has(self, image_id) -> bool:
        return self.path(image_id).exists() or self.array_path(image_id).exists()

    def put_array(self, image_id, array: np.ndarray) -> None:
        """Atomically write one image's entry as a single ``.npy`` array (memory-mappable)."""
        arr = np.ascontiguousarray(array)
        atomic_write(self.array_path(image_id), lambda f: np.save(f, arr, allow_pickle=False))

    def get_array(self, image_id, mmap: bool = True) -> np.ndarray:
        """One image's ``.npy`` entry, memory-mapped read-only by default (nothing read until used)."""
        path = self.array_path(image_id)
        if not path.exists():
            raise KeyError(f"no {self.stage} array entry for image {image_id!r} in {self.dir}")
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except _UNREADABLE as e:
            raise self._unreadable(path, e) from e

    def put(self, image_id, arrays: Mapping[str, np.ndarray]) -> None:
        """Atomically write one image's entry (a dict of arrays; names must not start with '_')."""
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        if any(k.startswith("_") for k in payload):
            raise ValueError(f"entry array names must not start with '_': {sorted(payload)}")
        payload["_image_id"] = np.asarray(str(image_id))
        atomic_write(self.path(image_id), lambda f: np.savez(f, **payload))

    def get(self, image_id) -> dict[str, np.ndarray]:
        """One image's entry as a dict of arrays."""
        path = self.path(image_id)
        if not path.exists():
            raise KeyError(f"no {self.stage} entry for image {image_id!r} in {self.dir}")
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
            stored = str(out.pop("_image_id"))
        except _UNREADABLE as e:
            raise self._unreadable(path, e) from e
        if stored != str(image_id):
            raise StoreError(f"{path}: entry belongs to image {stored!r}, not {image_id!r}")
        return out

    def _unreadable(self, path: Path, e: Exception) -> StoreError:
        """A damaged entry (a disk error, a copy cut short): the file is named, and deleting it is enough, since
        every stage recomputes the entries it finds missing."""
        return StoreError(
            f"{path}: unreadable {self.stage} entry ({type(e).__name__}: {e}); delete this file and run the "
            f"stage again to recompute it"
        )

    def missing(self, image_ids: Iterable) -> list:
        """The ids, in order, that have no entry yet."""
        return [i for i in image_ids if not self.has(i)]

    def __len__(self) -> int:
        return sum(1 for p in self.entries_dir.iterdir() if p.suffix in (".npz", ".npy") and not p.name.startswith("."))

    @classmethod
    def open(cls, run_dir: str | os.PathLike, stage: str, key: str) -> "StageStore":
        """An existing store by its key (e.g. an upstream stage's, from its metrics.json)."""
        manifest = Path(run_dir) / stage / key / "manifest.json"
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{manifest}: no readable {stage} store with key {key} ({e})") from e
        return cls(run_dir, stage, m["config"], m["inputs"], m["version"])
