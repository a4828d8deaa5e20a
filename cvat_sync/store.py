"""The local side of a pull: one folder per task, written so that nothing half-done is ever visible.

Layout under ``--out``::

    task-12/                          the dataset (what the trainer reads: ``--data out/task-12``)
        images/<frame name>           frames at original quality, as CVAT stores them
        annotations/instances_default.json   COCO 1.0 instances (pycocotools-loadable)
        cvat_sync.json                provenance: server, version, task updated_date, jobs, labels,
                                      every frame's sha256, time of the pull
    .staging-task-12/                 a pull in progress (frames land here one by one, each recorded in
                                      frames.jsonl once complete, so an interrupted pull resumes)
    .old-task-12/                     the previous dataset for an instant during the swap
    .task-12.lock                     held (flock) by the pull of task 12 while it runs

A pull builds ``.staging-task-N`` and then swaps it in with two renames; a crash between them is
repaired by the next run (:func:`recover`). Frames are reused from the previous dataset or from an
interrupted staging folder when their sha256 still matches.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from wbc_core.atomic import LockHeld, atomic_write_bytes, pid_lock, sha256_file

log = logging.getLogger(__name__)

PROVENANCE = "cvat_sync.json"
FORMAT = "cvat_sync/1"
MANIFEST = "frames.jsonl"


class StoreError(RuntimeError):
    """The local dataset folder cannot be written or is locked; the message says what to do."""

    exit_code = 6


def task_dir(out: Path, task_id: int) -> Path:
    return Path(out) / f"task-{task_id}"


def staging_dir(out: Path, task_id: int) -> Path:
    return Path(out) / f".staging-task-{task_id}"


def old_dir(out: Path, task_id: int) -> Path:
    return Path(out) / f".old-task-{task_id}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_relpath(name: str) -> Path:
    """A frame name as a relative path inside ``images/`` (CVAT names may hold folders; no escaping)."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts or any(p == ".." for p in parts):
        raise StoreError(f"frame name {name!r} is not a safe relative file name")
    return Path(*parts)


@contextlib.contextmanager
def task_lock(out: Path, task_id: int) -> Iterator[None]:
    """Exclusive lock for one task's folder; a second pull of the same task fails at once."""
    out.mkdir(parents=True, exist_ok=True)
    path = Path(out) / f".task-{task_id}.lock"
    try:
        held = pid_lock(path)
        held.__enter__()
    except LockHeld as exc:
        raise StoreError(f"another pull of task {task_id} is running ({exc}); wait for it to finish") from None
    try:
        yield
    finally:
        held.__exit__(None, None, None)


def recover(out: Path, task_id: int) -> None:
    """Finish or undo a swap that a crash interrupted (see the module docstring)."""
    final, old = task_dir(out, task_id), old_dir(out, task_id)
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
            log.warning("task %d: restored the previous dataset after an interrupted swap", task_id)


def read_provenance(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / PROVENANCE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


class Staging:
    """The folder a pull writes into; frames are added one at a time and recorded once complete."""

    def __init__(self, out: Path, task_id: int, data_key: str) -> None:
        self.dir = staging_dir(out, task_id)
        self.images = self.dir / "images"
        self.task_id = task_id
        self.data_key = data_key
        self.frames: dict[str, dict[str, Any]] = {}  # name -> {sha256, bytes}
        self._open()

    def _open(self) -> None:
        manifest = self.dir / MANIFEST
        key_file = self.dir / "data_key"
        if self.dir.exists() and (not key_file.is_file() or key_file.read_text() != self.data_key):
            shutil.rmtree(self.dir)  # left by a pull of other task data: start over
        self.images.mkdir(parents=True, exist_ok=True)
        if not key_file.is_file():
            atomic_write_bytes(key_file, self.data_key.encode())
        if manifest.is_file():
            for line in manifest.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                self.frames[entry["name"]] = entry
            if self.frames:
                log.info("task %d: resuming an interrupted pull (%d frames already here)", self.task_id,
                         len(self.frames))

    def path_of(self, name: str) -> Path:
        return self.images / safe_relpath(name)

    def has_valid(self, name: str, sha256: str | None = None) -> bool:
        """The frame is here, complete, and (when given) has this sha256."""
        entry = self.frames.get(name)
        path = self.path_of(name)
        if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        return sha256 is None or entry["sha256"] == sha256

    def _record(self, name: str, sha256: str, size: int) -> None:
        entry = {"name": name, "sha256": sha256, "bytes": size}
        self.frames[name] = entry
        with open(self.dir / MANIFEST, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add_bytes(self, name: str, data: bytes) -> str:
        """Write one frame atomically; returns its sha256. Disk full -> :class:`StoreError`."""
        path = self.path_of(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise _disk_error(exc, path) from None
        digest = sha256_bytes(data)
        self._record(name, digest, len(data))
        return digest

    def add_existing(self, name: str, source: Path, sha256: str) -> bool:
        """Reuse a frame file from the previous dataset if its content still has ``sha256``."""
        if not source.is_file() or sha256_file(source) != sha256:
            return False
        path = self.path_of(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            os.link(source, path)  # same file system: no copy
        except OSError:
            try:
                shutil.copy2(source, path)
            except OSError as exc:
                raise _disk_error(exc, path) from None
        self._record(name, sha256, path.stat().st_size)
        return True

    def write_json(self, relpath: str, data: Any) -> None:
        path = self.dir / relpath
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            raise _disk_error(exc, path) from None

    def commit(self, out: Path, keep: set[str]) -> Path:
        """Drop frames not in ``keep`` and the bookkeeping files, then swap the staging folder in."""
        for name in list(self.frames):
            if name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    self.path_of(name).unlink()
        for extra in (MANIFEST, "data_key"):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / extra).unlink()
        final, old = task_dir(out, self.task_id), old_dir(out, self.task_id)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(self.dir, final)
        shutil.rmtree(old, ignore_errors=True)
        return final


def _disk_error(exc: OSError, path: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"disk full while writing {path}; free some space and run the pull again (frames "
                          "already downloaded are kept and reused; the previous dataset is untouched)")
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")
