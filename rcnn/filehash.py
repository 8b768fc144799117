"""Files identified by what they hold: a content hash, computed once per file version on this machine.

Cache keys that named a file by its size and mtime differed between two copies of the same weights or
dataset (another node of a torchrun or Ray cluster, a copy to a GPU machine), so shards never saw each
other's entries. A content hash is the same everywhere. Hashing a dataset's images on every run would be
slow, so each hash is remembered in a local SQLite file, ``$RCNN_CACHE/content-hashes.sqlite`` (default
``~/.cache/rcnn-googlenet``), under the file's path, size, mtime and inode: a local shortcut only, never
part of a key. Where that file cannot be written, hashes are computed and not remembered.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Iterable

__all__ = ["content_hash", "content_hashes", "cache_dir"]

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$RCNN_CACHE``, else ``$XDG_CACHE_HOME/rcnn-googlenet``, else ``~/.cache/rcnn-googlenet``."""
    if os.environ.get("RCNN_CACHE"):
        return Path(os.environ["RCNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rcnn-googlenet"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _connect() -> sqlite3.Connection | None:
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(folder / "content-hashes.sqlite", timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, version TEXT NOT NULL, sha256 TEXT NOT NULL)")
        return db
    except (OSError, sqlite3.Error):
        return None


def _version(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def content_hashes(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The sha256 (hex) of each file's bytes; FileNotFoundError names a missing one."""
    paths = [Path(p).resolve() for p in paths]
    versions = [_version(p.stat()) for p in paths]
    db = _connect()
    known: dict[str, tuple[str, str]] = {}
    if db is not None:
        try:
            rows = db.execute("SELECT path, version, sha256 FROM hashes").fetchall() if len(paths) > 500 else [
                row for p in paths for row in db.execute("SELECT path, version, sha256 FROM hashes WHERE path = ?", (str(p),))
            ]  # fmt: skip
            known = {path: (version, sha) for path, version, sha in rows}
        except sqlite3.Error:
            db = None
    out, new = [], []
    for p, version in zip(paths, versions):
        hit = known.get(str(p))
        if hit is not None and hit[0] == version:
            out.append(hit[1])
            continue
        sha = _sha256(p)
        out.append(sha)
        new.append((str(p), version, sha))
    if db is not None:
        try:
            if new:
                with db:
                    db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?)", new)
            db.close()
        except sqlite3.Error:
            pass
    return out


def content_hash(path: str | os.PathLike) -> str:
    """The sha256 (hex) of one file's bytes (remembered as :func:`content_hashes`)."""
    return content_hashes([path])[0]
