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
    .task-12.lock                     held (flock) by the pull of task 12 while it runs (removed after)

Frame names from the server become paths below ``images/`` only through :func:`frame_file_name`
(normalised, never absolute, never climbing out); a pull that fails leaves ``--out`` as it was.

A pull builds ``.staging-task-N`` and then swaps it in with two renames; a crash between them is
repaired by the next run (:func:`recover`). Frames are reused from the previous dataset or from an
interrupted staging folder when their sha256 still matches.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from wbc_core.atomic import atomic_write_bytes, sha256_file

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


class UnsafeFrameName(StoreError):
    """A frame name from the server cannot become a file inside the dataset (control characters, ``..``,
    empty, too long); the message says which name and why."""


MAX_NAME_BYTES = 255    # one path component (file systems' NAME_MAX)
MAX_PATH_BYTES = 1024   # a whole frame name below images/


def frame_file_name(name: object) -> str:
    """A CVAT frame name as the relative POSIX path it gets below ``images/`` (what the dataset's COCO file
    references, and the trainer reads); :class:`UnsafeFrameName` when it cannot be one.

    Normalised, never escaping ``images/``: backslashes become ``/``; empty, ``.`` and leading ``/`` components
    are dropped (``/abs/x.jpg`` -> ``abs/x.jpg``, ``./x.jpg`` -> ``x.jpg``). Refused: ``..`` components, control
    characters (NUL, newline, escape, ...) and lone surrogates, names with nothing left, and names too long
    for a file system. Two names with the same result are a collision the caller must refuse.
    """
    if not isinstance(name, str):
        raise UnsafeFrameName(f"frame name {name!r} is not a string")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise UnsafeFrameName(f"frame name {name!r} contains the control character {bad!r}")
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", ".", "/")]
    if not parts:
        raise UnsafeFrameName(f"frame name {name!r} has no file name in it")
    if ".." in parts:
        raise UnsafeFrameName(f"frame name {name!r} climbs out of its folder ('..')")
    if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts) or len(name.encode("utf-8")) > MAX_PATH_BYTES:
        raise UnsafeFrameName(f"frame name {name[:80]!r}... is too long for a file name")
    return "/".join(parts)


def safe_relpath(name: str) -> Path:
    """A frame name as a relative path inside ``images/`` (CVAT names may hold folders; no escaping)."""
    try:
        return Path(frame_file_name(name))
    except UnsafeFrameName as exc:
        raise StoreError(f"frame name {name!r} is not a safe relative file name ({exc})") from None


def lock_path(out: Path, task_id: int) -> Path:
    return Path(out) / f".task-{task_id}.lock"


@contextlib.contextmanager
def task_lock(out: Path, task_id: int) -> Iterator[None]:
    """Exclusive lock for one task's folder; a second pull of the same task fails at once.

    The lock file (``flock``, holding the pid) exists only while a pull runs: it is removed before the lock is
    released, and a pull that locked a file someone removed meanwhile takes a fresh one, so two pulls never
    hold "the" lock at once.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = lock_path(out, task_id)
    for _ in range(5):
        fh = open(path, "a+")  # noqa: SIM115 - held for the duration of the with-block
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise StoreError(f"another pull of task {task_id} is running (pid {holder or '?'} holds {path}); "
                             "wait for it to finish") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # the holder we waited for removed it: lock the new one
    else:
        raise StoreError(f"could not take the lock {path}; another pull of task {task_id} keeps replacing it")
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before unlocking: whoever opened it meanwhile sees it is gone and retries
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def created_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (for :func:`remove_empty_dirs`)."""
    missing = []
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            break
        missing.append(folder)
    return missing


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove these folders (deepest first) where they are empty: what a pull created and left unused."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (a dataset, or a staging folder kept for resuming) or already gone


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
