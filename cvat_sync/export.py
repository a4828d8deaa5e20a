"""CVAT's dataset export, both flows, ending in a zip on disk.

- Requests API (CVAT >= 2.17): ``POST /api/tasks/{id}/dataset/export?format=F&save_images=true`` -> 202
  ``{rq_id}`` -> poll ``GET /api/requests/{rq_id}`` until ``finished`` (or ``failed``) -> ``GET result_url``.
  A repeated POST while the same export runs is a 409; the ``result_url`` works once (the server drops
  the request after the download), so a broken download restarts the export.
- Legacy (removed in 2.32): ``GET /api/tasks/{id}/dataset?format=F`` -> 202 while preparing, 201 when
  ready -> the same with ``&action=download`` -> 200 zip. Used when the server has no export route.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cvat_sync.client import CvatClient, CvatError, ServerUnavailable

log = logging.getLogger(__name__)


class ExportFailed(CvatError):
    exit_code = 6


def download_export(client: CvatClient, task_id: int, fmt: str, dest: Path, poll_s: float = 1.0,
                    timeout_s: float = 1800.0, attempts: int = 3) -> Path:
    """Export task ``task_id`` with its images in format ``fmt`` into the zip ``dest``."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            url = _prepare(client, task_id, fmt, poll_s, timeout_s)
            size = client.download(url, dest, what=f"export of task {task_id}")
            log.info("task %d: export %r downloaded (%.1f MB)", task_id, fmt, size / 1e6)
            return dest
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
