"""Model registry: numbered, verified copies of model bundles and a ``current`` symlink the function serves.

Layout of a registry root (for example ``models/registry`` or ``/opt/wbc/models`` on the Docker host)::

    v0001/              a complete bundle (bundle.yaml, model.pt, optional classifier.pt) + registry.yaml
    v0002/
    current -> v0002    relative symlink: the version being served (WBC_BUNDLE_DIR=/models/current)
    history.jsonl       one JSON event per line: added, promoted, rollback, refused, pruned
    .retrain.lock       flock held by the retraining run (``Registry.lock``); holds its pid
    .staging-*/         a version being written (left over only by a crash; ``clean_staging`` removes it)

``registry.yaml`` holds ``version``, ``created_at`` (UTC, ISO 8601), ``files`` (the sha256 of every file of
the version) and whatever the caller passed as ``info`` (metrics, data provenance, git sha, gate decision).

Crash safety: a version is written into ``.staging-<random>/``, verified, fsynced and only then renamed
to ``vNNNN`` (one ``rename``), so a version directory is always complete. ``current`` is switched by
creating ``.current-<random> -> vNNNN`` and ``os.replace``-ing it onto ``current`` (atomic), after the
version was verified again. A crash at any point leaves ``current`` on a complete, verified version.
Deletion (``prune``) renames a version to ``.deleting-*`` before removing it, for the same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from wbc_core.atomic import LockHeld, pid_lock, sha256_file
from wbc_core.bundle import BundleError, load_bundle

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.yaml"
HISTORY_FILE = "history.jsonl"
CURRENT = "current"
DEFAULT_ROOT = Path("models/registry")
VERSION_RE = re.compile(r"^v(\d{4,})$")
LOCK_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
RESERVED_KEYS = ("version", "created_at", "files")
LEFTOVER_PREFIXES = (".staging-", ".current-", ".deleting-")


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message names the version or file."""


class RegistryBusy(RegistryError):
    """Another process holds the registry lock (``pid`` is the holder's, when it could be read)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (fsynced) and return its sha256."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    shutil.copystat(src, dst)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``info`` as plain YAML types: numpy scalars/arrays, paths and tuples are converted."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or type(value) in (bool, int, float, str):
        return value
    for plain in (bool, int, float, str):  # subclasses (numpy.float64 is a float) as the plain type
        if isinstance(value, plain):
            return plain(value)
    if hasattr(value, "tolist"):  # numpy scalar or array, torch tensor
        return _plain(value.tolist())
    return str(value)


def _version_number(name: str) -> int | None:
    match = VERSION_RE.match(name)
    return int(match.group(1)) if match else None


class Registry:
    """Versioned model bundles under ``root`` with an atomically switched ``current`` symlink."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- reading ----------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Version names, oldest first (staging, dot and other entries are ignored)."""
        if not self.root.is_dir():
            return []
        found = [(n, e.name) for e in self.root.iterdir()
                 if (n := _version_number(e.name)) is not None and e.is_dir() and not e.is_symlink()]
        return [name for _, name in sorted(found)]

    @property
    def current_path(self) -> Path:
        return self.root / CURRENT

    def current(self) -> str | None:
        """The version ``current`` points at, or None when there is no ``current`` symlink."""
        try:
            target = os.readlink(self.current_path)
        except OSError:  # missing, or not a symlink
            return None
        return Path(target).name or None

    def path(self, version: str) -> Path:
        if _version_number(str(version)) is None:
            raise RegistryError(f"{version!r} is not a version name (expected v0001, v0002, ...)")
        directory = self.root / version
        if not directory.is_dir() or directory.is_symlink():
            known = self.versions()
            listing = ", ".join(known) if known else "none: the registry is empty"
            raise RegistryError(f"unknown version {version} in registry {self.root} (versions: {listing})")
        return directory

    def _meta(self, version: str) -> dict[str, Any]:
        path = self.path(version) / REGISTRY_FILE
        try:
            meta = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"version {version} is incomplete: {path} is missing") from None
        except (OSError, yaml.YAMLError) as exc:
            raise RegistryError(f"{path} is not readable YAML: {exc}") from exc
        if not isinstance(meta, dict):
            raise RegistryError(f"{path} is not a mapping")
        return meta

    def show(self, version: str) -> dict[str, Any]:
        """``registry.yaml`` of ``version`` plus ``current`` (bool) and ``path``."""
        meta = self._meta(version)
        return {**meta, "current": self.current() == version, "path": str(self.path(version))}

    def verify(self, version: str) -> None:
        """Check every file's sha256 from ``registry.yaml`` and the bundle itself (``load_bundle``).

        Raises :class:`RegistryError` naming the missing or corrupt file.
        """
        directory = self.path(version)
        files = self._meta(version).get("files")
        if not isinstance(files, dict) or not files:
            raise RegistryError(f"{directory / REGISTRY_FILE} lists no files")
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                raise RegistryError(f"version {version} is incomplete: {path} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise RegistryError(f"version {version} is corrupt: {path} has sha256 {actual[:12]}..., "
                                    f"registry.yaml says {str(expected)[:12]}...")
        try:
            load_bundle(directory)
        except BundleError as exc:
            raise RegistryError(f"version {version} is not a valid bundle: {exc}") from exc

    # --- history ----------------------------------------------------------------------------------

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY_FILE

    def record(self, event: dict[str, Any]) -> None:
        """Append one event (with ``time``) to ``history.jsonl`` as a single fsynced write."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": _utc_now(), **_plain(event)}, sort_keys=False) + "\n"
        fd = os.open(self.history_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # end a line torn by a crash, so this event stays readable
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def history(self) -> list[dict[str, Any]]:
        """The recorded events, oldest first (a torn last line from a crash is skipped)."""
        try:
            lines = self.history_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (interrupted write?); skipped", self.history_path, number)
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def _next_number(self) -> int:
        numbers = [_version_number(v) or 0 for v in self.versions()]
        numbers += [n for e in self.history() if (n := _version_number(str(e.get("version", "")))) is not None]
        return max(numbers, default=0) + 1

    # --- writing ----------------------------------------------------------------------------------

    def add(self, bundle_dir: str | Path, info: dict[str, Any]) -> str:
        """Copy a bundle into the registry as the next version (never touches ``current``); returns it.

        The copy is verified with :func:`wbc_core.bundle.load_bundle` (checksums) before it becomes a
        version. ``info`` (metrics, provenance, gate decision, ...) is stored in ``registry.yaml``.
        """
        source = Path(bundle_dir)
        if not source.is_dir():
            raise RegistryError(f"bundle folder {source} does not exist")
        clash = sorted(set(info) & set(RESERVED_KEYS))
        if clash:
            raise RegistryError(f"info may not set {clash}: the registry writes them")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(self.root / f".staging-{secrets.token_hex(6)}")
        staging.mkdir()
        try:
            files: dict[str, str] = {}
            for src in sorted(source.rglob("*")):
                rel = src.relative_to(source)
                if any(part.startswith(".") for part in rel.parts) or rel.as_posix() == REGISTRY_FILE:
                    continue  # leftover temporary files of an atomic write; a stale registry.yaml
                if src.is_dir():
                    continue
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                files[rel.as_posix()] = _copy_file(src, dst)
            try:
                load_bundle(staging)
            except BundleError as exc:
                raise RegistryError(f"cannot add {source}: {exc}") from exc
            meta: dict[str, Any] = {"version": None, "created_at": _utc_now(), "files": files, **_plain(info)}
            while True:
                version = f"v{self._next_number():04d}"
                meta["version"] = version
                with open(staging / REGISTRY_FILE, "w") as fh:
                    fh.write(yaml.safe_dump(meta, sort_keys=False))
                    fh.flush()
                    os.fsync(fh.fileno())
                _fsync_dir(staging)
                try:
                    os.rename(staging, self.root / version)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer took this number
                        continue
                    raise
                break
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        self.record({"kind": "added", "version": version, "source": str(source.resolve())})
        log.info("registry %s: added %s from %s", self.root, version, source)
        return version

    def _switch(self, version: str, kind: str, reason: str) -> None:
        self.path(version)  # an unknown version is an error, not a refused promotion
        previous = self.current()
        try:
            self.verify(version)
        except RegistryError as exc:
            self.record({"kind": "refused", "version": version, "action": kind, "reason": reason,
                         "error": str(exc), "current": previous})
            raise RegistryError(f"refused to make {version} current: {exc}") from exc
        link = self.current_path
        if link.exists() and not link.is_symlink():
            raise RegistryError(f"{link} is not a symlink; move it away so the registry can manage it")
        tmp = self.root / f".current-{secrets.token_hex(6)}"
        os.symlink(version, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.root)
        self.record({"kind": kind, "version": version, "previous": previous, "reason": reason})
        log.info("registry %s: current %s -> %s (%s)", self.root, previous, version, reason or kind)

    def promote(self, version: str, reason: str = "") -> None:
        """Verify ``version`` and atomically make it ``current``; a bad version is refused (event ``refused``)."""
        self._switch(version, "promoted", reason)

    def rollback(self, version: str) -> None:
        """:meth:`promote` an earlier version, recorded as a ``rollback`` event."""
        self._switch(version, "rollback", "rollback")

    def prune(self, keep: int) -> list[str]:
        """Delete the oldest versions beyond the newest ``keep``, never the current one; returns the deleted."""
        if keep < 0:
            raise RegistryError(f"--keep must be 0 or more, got {keep}")
        current = self.current()
        versions = self.versions()
        doomed = [v for v in (versions[:-keep] if keep else versions) if v != current]
        for version in doomed:
            trash = self.root / f".deleting-{version}-{secrets.token_hex(4)}"
            os.rename(self.root / version, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            _fsync_dir(self.root)
            self.record({"kind": "pruned", "versions": doomed, "keep": keep, "current": current})
            log.info("registry %s: pruned %s", self.root, ", ".join(doomed))
        return doomed

    @contextlib.contextmanager
    def lock(self, name: str = "retrain") -> Iterator[None]:
        """Exclusive, non-blocking ``flock`` on ``root/.<name>.lock``; :class:`RegistryBusy` if held."""
        if not LOCK_NAME_RE.match(name):
            raise RegistryError(f"bad lock name {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".{name}.lock"
        try:
            held = pid_lock(path)
            held.__enter__()
        except LockHeld as exc:
            raise RegistryBusy(f"registry {self.root} is busy: {exc}; wait for it to finish", exc.pid) from None
        try:
            yield
        finally:
            held.__exit__(None, None, None)

    def clean_staging(self) -> None:
        """Remove what a crashed run left behind (``.staging-*``, ``.current-*``, ``.deleting-*``).

        Call it only while holding :meth:`lock`: another writer's staging folder looks the same.
        """
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if not entry.name.startswith(LEFTOVER_PREFIXES):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            log.warning("registry %s: removed %s left by an interrupted run", self.root, entry.name)


# --- CLI (python -m trainer registry ...) ------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``registry`` sub-commands; ``--root`` is accepted before or after the action."""
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"registry folder (default: {DEFAULT_ROOT})")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=description)
        p.add_argument("--root", type=Path, default=argparse.SUPPRESS,
                       help=f"registry folder (default: {DEFAULT_ROOT})")
        return p

    version_help = "a version of the registry, e.g. v0003 (see 'list')"
    action("list", "versions with creation time, mask AP and macro-F1; * marks current",
           "Print a table of the versions under --root with their creation time, mask AP and macro-F1; "
           "* marks the current version (the one the CVAT function serves). Reads only.")
    action("show", "print a version's registry.yaml",
           "Print a version's registry.yaml: creation time, the sha256 of its files, metrics, training data "
           "provenance and the gate decision. Reads only.").add_argument("version", help=version_help)
    action("rollback", "make an earlier version current again (verified first)",
           "Point 'current' at an earlier version again, after checking its files against their sha256; the "
           "switch is one atomic rename and is recorded in history.jsonl.").add_argument("version", help=version_help)
    action("verify", "check a version's files against their sha256",
           "Check every file of a version against the sha256 recorded in its registry.yaml and that the bundle "
           "loads; prints 'ok' or fails with exit code 2. Reads only.").add_argument("version", help=version_help)
    action("prune", "delete old versions, keeping the newest N and the current one",
           "Delete old versions, keeping the newest --keep versions and always the current one; takes the "
           "registry lock and records each deletion in history.jsonl.").add_argument(
        "--keep", type=int, required=True, help="how many of the newest versions to keep (the current one is "
                                                "kept in any case)")


def _metric(metrics: Any, key: str) -> str:
    if not isinstance(metrics, dict):
        return "-"
    for scope in (metrics, metrics.get("candidate")):
        if isinstance(scope, dict) and isinstance(scope.get(key), (int, float)):
            return f"{scope[key]:.3f}"
    return "-"


def list_table(registry: Registry) -> str:
    """The ``list`` table: version, created, current marker, mask AP, macro-F1."""
    versions = registry.versions()
    if not versions:
        raise RegistryError(f"registry {registry.root} is empty (no versions)")
    current = registry.current()
    rows = [("", "version", "created", "mask AP", "macro-F1")]
    for version in versions:
        try:
            meta = registry._meta(version)
        except RegistryError as exc:
            log.warning("%s", exc)
            meta = {}
        metrics = meta.get("metrics")
        rows.append(("*" if version == current else "", version, str(meta.get("created_at", "?")),
                     _metric(metrics, "mask_ap"), _metric(metrics, "macro_f1")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
    return "\n".join(lines) + "\n"


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m trainer registry ACTION``; errors are logged and give exit code 2."""
    registry = Registry(args.root)
    try:
        if args.action == "list":
            sys.stdout.write(list_table(registry))
        elif args.action == "show":
            sys.stdout.write(yaml.safe_dump(registry.show(args.version), sort_keys=False))
        elif args.action == "rollback":  # no lock: the switch is atomic, and a rollback must not wait for a retrain
            registry.rollback(args.version)
            sys.stdout.write(f"current -> {args.version}\n")
        elif args.action == "verify":
            registry.verify(args.version)
            sys.stdout.write(f"{args.version}: ok\n")
        elif args.action == "prune":
            with registry.lock():
                deleted = registry.prune(args.keep)
            sys.stdout.write(f"deleted: {', '.join(deleted) if deleted else 'nothing'}\n")
    except RegistryError as exc:
        log.error("%s", exc)
        return 2
    return 0
