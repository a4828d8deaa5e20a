"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

A crash, a kill or Ctrl-C leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRIVATE = 0o600  # ``mode=PRIVATE``: readable and writable by the owner only, whatever the umask


def _umask_by_setting() -> int:
    """The umask read the only portable way, by setting it and back. Briefly 077 so that a file another
    thread creates in between is too private rather than too open; used once, at import."""
    old = os.umask(0o077)
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _umask_by_setting()


def current_umask() -> int:
    """The process umask now: from ``/proc/self/status`` (Linux >= 4.7; a read, so thread-safe), else the
    value read at import."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def default_mode() -> int:
    """What ``open(path, "w")`` would create: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def _temp_file(path: Path, mode: int | None) -> tuple[int, str]:
    """A 0600 temporary file next to ``path``, then set to ``mode`` (default: :func:`default_mode`).

    ``mkstemp`` always creates 0600; ``fchmod`` on the open descriptor widens it before any data is in
    it, and the final ``os.replace`` keeps the mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically. The file gets ``mode`` (e.g. :data:`PRIVATE` for credentials),
    by default ``0o666 & ~umask`` like any other file the process creates."""
    path = Path(path)
    fd, tmp = _temp_file(path, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path, mode: int | None = None) -> None:
    """``torch.save`` to ``path`` atomically; ``mode`` as in :func:`atomic_write_bytes`."""
    import torch

    path = Path(path)
    fd, tmp = _temp_file(path, mode)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LockHeld(OSError):
    """Another process holds the lock file (``pid``: the holder's, when it could be read)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"lock {path} is held by {holder}")
        self.path, self.pid = path, pid


@contextlib.contextmanager
def pid_lock(path: str | Path) -> Iterator[None]:
    """Exclusive, non-blocking ``flock`` on ``path``, which then holds this process's pid.

    Raises :class:`LockHeld` at once if another process holds it. The kernel drops the lock when the
    process dies, so a crash never leaves a stale lock behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held for the duration of the with-block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            raise LockHeld(path, int(text) if text.isdigit() else None) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
