"""CVAT's dataset export, both flows, ending in a zip on disk.

- Requests API (CVAT >= 2.17): ``POST /api/tasks/{id}/dataset/export?format=F&save_images=true`` -> 202
  ``{rq_id}`` -> poll ``GET /api/requests/{rq_id}`` until ``finished`` (or ``failed``) -> ``GET result_url``.
  A repeated POST while the same export runs is a 409; the ``result_url`` works once (the server drops
  the request after the download), so a broken download restarts the export.
- Legacy (removed in 2.32): ``GET /api/tasks/{id}/dataset?format=F`` -> 202 while preparing, 201 when
  ready -> the same with ``&action=download`` -> 200 zip. Used when the server has no export route.

The zip is the server's word, so it is read defensively (:class:`ExportZip`): its declared sizes and
compression ratio are checked before anything is inflated, the same limits hold while inflating (declared
sizes can lie), and only the members needed are read: the annotations file(s) and the frames' images, found
by their normalised frame names and written under names of our own, never at the paths the zip stores.
"""

from __future__ import annotations

import logging
import re
import time
import zipfile
import zlib
from pathlib import Path

from cvat_sync.client import CvatClient, CvatError, ServerUnavailable, TooLarge
from cvat_sync.store import UnsafeFrameName, _disk_error, frame_file_name

log = logging.getLogger(__name__)

COCO = "COCO 1.0"
CVAT_IMAGES = "CVAT for images 1.1"
# below this many uncompressed bytes an export is too small to harm anyone, whatever its compression ratio
RATIO_FLOOR = 64 << 20
_COCO_ANNOTATIONS = re.compile(r"annotations/(instances_[A-Za-z0-9_.-]+\.json)")


class ExportFailed(CvatError):
    exit_code = 6


class ExportRefused(ExportFailed):
    """The export zip is unsafe or unusable (bigger than the limits, a zip bomb, corrupt); nothing was written."""


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def download_export(client: CvatClient, task_id: int, fmt: str, dest: Path, poll_s: float = 1.0,
                    timeout_s: float = 1800.0, attempts: int = 3, max_bytes: int | None = None) -> Path:
    """Export task ``task_id`` with its images in format ``fmt`` into the zip ``dest`` (at most ``max_bytes``:
    else :class:`ExportRefused`, nothing kept)."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            url = _prepare(client, task_id, fmt, poll_s, timeout_s)
            size = client.download(url, dest, what=f"export of task {task_id}", max_bytes=max_bytes)
            log.info("task %d: export %r downloaded (%.1f MB)", task_id, fmt, size / 1e6)
            return dest
        except TooLarge as exc:
            raise ExportRefused(f"task {task_id}: the export is larger than --max-export-size "
                                f"({size_text(exc.limit)}); nothing was written. If the task really is that big, "
                                "raise --max-export-size (max_export_size in the config), or pull with --via api"
                                ) from None
        except ServerUnavailable as exc:  # a cut download: the one-shot result is gone, export again
            last = exc
            log.warning("task %d: export download failed (%s); exporting again (%d/%d)", task_id, exc,
                        attempt + 1, attempts)
        except CvatError as exc:
            if exc.status == 400 and "Unknown export request" in str(exc):
                last = exc
                continue
            raise
    raise ServerUnavailable(f"task {task_id}: the export could not be downloaded after {attempts} tries ({last})")


def _prepare(client: CvatClient, task_id: int, fmt: str, poll_s: float, timeout_s: float) -> str:
    """Start (or join) an export and wait until it is ready; returns the URL to download."""
    deadline = time.monotonic() + timeout_s
    params = {"format": fmt, "save_images": "true"}
    while True:
        resp = client._send("POST", f"/api/tasks/{task_id}/dataset/export", params=params)
        if resp.status_code == 202:
            rq_id = str(resp.json()["rq_id"])
            break
        if resp.status_code == 409:  # the same export is already running: wait for it
            _wait(deadline, poll_s, task_id)
            continue
        if resp.status_code in (404, 405):
            log.info("task %d: server has no export requests API; using the legacy export flow", task_id)
            return _prepare_legacy(client, task_id, fmt, poll_s, deadline)
        client._raise_for(resp, f"export of task {task_id} as {fmt!r}")
    while True:
        status = client.get_json(f"/api/requests/{rq_id}", what=f"export request {rq_id}")
        state = status.get("status")
        if state == "finished" and status.get("result_url"):
            return str(status["result_url"])
        if state == "failed":
            raise ExportFailed(f"CVAT failed to export task {task_id} as {fmt!r}: "
                               f"{status.get('message') or 'no message'}; see the server's export worker log")
        _wait(deadline, poll_s, task_id)


def _prepare_legacy(client: CvatClient, task_id: int, fmt: str, poll_s: float, deadline: float) -> str:
    path = f"/api/tasks/{task_id}/dataset"
    while True:
        resp = client.request("GET", path, params={"format": fmt}, ok=(201, 202), what=f"export of task {task_id}")
        if resp.status_code == 201:
            return client.url_for(path) + "?" + "&".join(
                [f"format={fmt.replace(' ', '+')}", "action=download"])
        _wait(deadline, poll_s, task_id)


def _wait(deadline: float, poll_s: float, task_id: int) -> None:
    if time.monotonic() > deadline:
        raise ExportFailed(f"task {task_id}: the export did not finish in time; try again later")
    time.sleep(poll_s)


class ExportZip:
    """A downloaded export zip, read defensively (see the module docstring).

    ``ExportZip(path, task_id, max_bytes, max_ratio)`` refuses (:class:`ExportRefused`) a zip that is not one,
    or whose members declare more than ``max_bytes`` in all, or (above :data:`RATIO_FLOOR`) more than
    ``max_ratio`` times the zip's size. :meth:`extract` then inflates one member into a file of our choosing,
    stopping at the member's declared size and at the same limits over everything inflated.
    """

    def __init__(self, path: Path, task_id: int, max_bytes: int, max_ratio: float) -> None:
        self.task_id = task_id
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ExportRefused(f"task {task_id}: the export is not a valid zip ({exc}); nothing was written. "
                                "Run the pull again") from None
        packed = max(path.stat().st_size, 1)
        declared = sum(max(info.file_size, 0) for info in self.zf.infolist())
        if declared > max_bytes:
            self.close()
            raise ExportRefused(f"task {task_id}: the export would extract to {size_text(declared)}, more than "
                                f"--max-export-size ({size_text(max_bytes)}); nothing was written. If the task "
                                "really is that big, raise --max-export-size (max_export_size in the config)")
        if declared > RATIO_FLOOR and declared > max_ratio * packed:
            self.close()
            raise ExportRefused(f"task {task_id}: the export is a {size_text(packed)} zip that would extract to "
                                f"{size_text(declared)} (compression ratio {declared / packed:.0f}:1, above "
                                f"--max-export-ratio {max_ratio:g}): a zip bomb? Nothing was written")
        self.limit = min(max_bytes, max(RATIO_FLOOR, int(max_ratio * packed)))
        self.inflated = 0

    def close(self) -> None:
        self.zf.close()

    def __enter__(self) -> ExportZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def annotation_members(self, fmt: str) -> list[tuple[zipfile.ZipInfo, str]]:
        """The annotation files of a ``fmt`` export, each with the (safe) file name to extract it as."""
        found = []
        for info in self.zf.infolist():
            if fmt == COCO:
                match = _COCO_ANNOTATIONS.fullmatch(info.filename)
                if match:
                    found.append((info, match.group(1)))
            elif info.filename == "annotations.xml":
                found.append((info, "annotations.xml"))
        if not found:
            want = "annotations/instances_<subset>.json" if fmt == COCO else "annotations.xml"
            raise ExportRefused(f"task {self.task_id}: the export holds no {want}; it is not a {fmt!r} export. "
                                "Nothing was written")
        return found

    def image_members(self, fmt: str) -> dict[str, list[zipfile.ZipInfo]]:
        """The export's image files by the frame name they hold, normalised like the dataset's names
        (:func:`~cvat_sync.store.frame_file_name`): ``images/<subset>/<name>`` for COCO 1.0, ``images/<name>``
        for CVAT for images 1.1. Members whose names cannot be frame names are left out."""
        index: dict[str, list[zipfile.ZipInfo]] = {}
        for info in self.zf.infolist():
            if info.is_dir() or not info.filename.startswith("images/"):
                continue
            rest = info.filename[len("images/"):]
            if fmt == COCO:
                if "/" not in rest:
                    continue
                rest = rest.split("/", 1)[1]  # the subset folder
            try:
                name = frame_file_name(rest)
            except UnsafeFrameName:
                continue
            index.setdefault(name, []).append(info)
        return index

    def extract(self, info: zipfile.ZipInfo, dest: Path) -> Path:
        """Inflate ``info`` into ``dest``: never more than it declares, nor more than the limits over all
        members; a corrupt member (bad CRC, bad data, encrypted) is refused. Nothing is left on failure."""
        written = 0
        try:
            with self.zf.open(info) as src, open(dest, "wb") as fh:
                while True:
                    try:
                        chunk = src.read(1 << 20)
                    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
                        raise ExportRefused(f"task {self.task_id}: the export is corrupt: {info.filename!r}: {exc}; "
                                            "nothing was written. Run the pull again") from None
                    if not chunk:
                        break
                    written += len(chunk)
                    self.inflated += len(chunk)
                    if written > info.file_size or self.inflated > self.limit:
                        raise ExportRefused(f"task {self.task_id}: the export's {info.filename!r} inflates to more "
                                            f"than it declares ({size_text(info.file_size)}) or than the limits "
                                            f"allow ({size_text(self.limit)}): a zip bomb? Nothing was written")
                    fh.write(chunk)
        except ExportRefused:
            dest.unlink(missing_ok=True)
            raise
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, ValueError) as exc:
            dest.unlink(missing_ok=True)  # zf.open: a bad local header, an encrypted member, an unknown method
            raise ExportRefused(f"task {self.task_id}: the export is corrupt or unreadable: {info.filename!r}: "
                                f"{exc}; nothing was written") from None
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise _disk_error(exc, dest) from None
        return dest
