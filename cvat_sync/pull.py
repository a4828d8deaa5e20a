"""Pull annotated CVAT tasks into local training datasets: incremental, resumable, never half-written.

For each task: task -> jobs (only those the ``jobs`` filter admits) -> [unchanged? stop here] -> labels
-> ``data/meta`` -> annotations -> frames of admitted jobs (minus deleted frames) downloaded in parallel,
or reused when already present with the same sha256 -> COCO instances + provenance -> swap into place.

Two ways to get the annotations (``via``): ``api`` reads ``/api/tasks/{id}/annotations`` and frames one by
one; ``export`` asks CVAT for a dataset export (``POST .../dataset/export`` + ``/api/requests``, or the
legacy ``GET .../dataset?format=`` flow on servers that predate the requests API) and reads the zip.
Both write the same dataset for the same task.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from PIL import Image
from tqdm import tqdm

from cvat_sync.client import CvatClient, CvatError, NotFound, TooLarge
from cvat_sync.config import DEFAULT_MAX_EXPORT_BYTES, DEFAULT_MAX_EXPORT_RATIO
from cvat_sync.convert import MAX_FRAME_PIXELS, convert_annotations, label_attribute_names
from cvat_sync.export import ExportZip, download_export
from cvat_sync.store import (
    FORMAT,
    PROVENANCE,
    Staging,
    StoreError,
    UnsafeFrameName,
    created_dirs,
    frame_file_name,
    read_provenance,
    recover,
    remove_empty_dirs,
    sha256_file,
    task_dir,
    task_lock,
)
from wbc_core.data.coco import write_coco
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import LabelMap

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("COCO 1.0", "CVAT for images 1.1")
NAMES = "relative/1"          # how frame names become files (store.frame_file_name); part of the signature
MAX_TASK_FRAMES = 10_000_000  # more frames than any CVAT task: a number the server should never send


class PullError(CvatError):
    """The task cannot be pulled as asked (no admitted jobs, bad frames, unknown labels with --strict-labels)."""

    exit_code = 6


@dataclass
class PullOptions:
    out: Path = Path("data/cvat")
    jobs: str = "completed"            # completed | accepted | all
    via: str = "api"                   # api | export
    export_format: str = "COCO 1.0"
    dry_run: bool = False
    workers: int = 8
    label_map: LabelMap | None = None  # labels the trainer knows; others are reported
    strict_labels: bool = False
    skip_bad_frames: bool = False
    progress: bool = True
    export_poll_s: float = 1.0
    max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES    # --via export: uncompressed size limit
    max_export_ratio: float = DEFAULT_MAX_EXPORT_RATIO  # --via export: compression ratio limit (zip bombs)


@dataclass
class TaskReport:
    task_id: int
    name: str = ""
    status: str = ""                   # pulled | unchanged | dry-run
    frames: int = 0                    # frames in the dataset
    downloaded: int = 0
    reused: int = 0
    image_bytes: int = 0
    shapes: Counter[str] = field(default_factory=Counter)
    skipped_frames: Counter[str] = field(default_factory=Counter)
    skipped_shapes: Counter[str] = field(default_factory=Counter)
    unknown_labels: Counter[str] = field(default_factory=Counter)
    jobs: dict[str, int] = field(default_factory=dict)
    out_dir: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.__dict__.items()}


def admitted(job: dict, jobs_filter: str) -> bool:
    """Whether a job's frames go into the training set under ``jobs_filter``."""
    if job.get("type", "annotation") != "annotation":
        return False  # ground-truth / consensus replica jobs are not the lab's annotation work
    if jobs_filter == "all":
        return True
    if jobs_filter == "accepted":
        return job.get("state") == "completed" and job.get("stage") == "acceptance"
    return job.get("state") == "completed"


def job_signature(jobs: list[dict]) -> list[dict]:
    keys = ("id", "state", "stage", "start_frame", "stop_frame", "updated_date", "type")
    return sorted(({k: j.get(k) for k in keys} for j in jobs), key=lambda j: j["id"])


def _describe_states(jobs: list[dict]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(Counter(str(j.get("state")) for j in jobs).items()))


def _is_image(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            img.verify()
        return size
    except Exception:
        return None


class Puller:
    def __init__(self, client: CvatClient, options: PullOptions) -> None:
        self.client = client
        self.opts = options
        self._export_tmp: Path | None = None

    # --- task list ----------------------------------------------------------------------------

    def project_tasks(self, project_id: int) -> list[int]:
        self.client.get_json(f"/api/projects/{project_id}", what=f"project {project_id}")
        ids = []
        for t in self.client.paginate("/api/tasks", {"project_id": project_id}, what=f"tasks of project {project_id}"):
            tid = t.get("id") if isinstance(t, dict) else None
            if not _is_int(tid) or tid < 0:
                raise PullError(f"project {project_id}: the task list holds a task with the id {tid!r}")
            ids.append(tid)
        if not ids:
            raise PullError(f"project {project_id} has no tasks visible to you")
        return sorted(ids)

    # --- one task -----------------------------------------------------------------------------

    def pull(self, task_id: int) -> TaskReport:
        """Pull one task. The task and its jobs are read and checked before anything is written; a pull that
        fails or refuses leaves ``--out`` as it was (no new folder, no lock, the previous dataset untouched;
        only frames already downloaded stay in ``.staging-task-N`` for the next run)."""
        out = Path(self.opts.out)
        report = TaskReport(task_id=task_id)
        t0 = time.perf_counter()
        task, jobs, size = self._read_task(task_id, report)
        made = created_dirs(out)
        try:
            with task_lock(out, task_id):
                recover(out, task_id)
                self._pull_locked(task_id, out, report, task, jobs, size)
        finally:
            if self._export_tmp is not None:
                shutil.rmtree(self._export_tmp, ignore_errors=True)
                self._export_tmp = None
            remove_empty_dirs(made)  # a dry run, or a failure, leaves no folder it created
        report.seconds = round(time.perf_counter() - t0, 2)
        return report

    def _read_task(self, task_id: int, report: TaskReport) -> tuple[dict, list[dict], int]:
        """The task, its jobs and its size in frames, every number checked (:func:`check_task`)."""
        client = self.client
        what = f"task {task_id}"
        task = client.get_json(f"/api/tasks/{task_id}", what=what)
        if not isinstance(task, dict):
            raise PullError(f"{what}: the server's answer is not a task ({type(task).__name__})")
        report.name = printable(str(task.get("name", "")))
        if task.get("size") in (None, 0):
            raise PullError(f"task {task_id} ({report.name}) has no images yet; nothing to pull")
        jobs = list(client.paginate("/api/jobs", {"task_id": task_id}, what=f"jobs of {what}"))
        size = check_task(task_id, task, jobs)
        return task, jobs, size

    def _pull_locked(self, task_id: int, out: Path, report: TaskReport, task: dict, jobs: list[dict],
                     size: int) -> None:
        client, opts = self.client, self.opts
        what = f"task {task_id}"
        chosen = [j for j in jobs if admitted(j, opts.jobs)]
        report.jobs = {"total": len(jobs), "admitted": len(chosen)}
        if not chosen:
            hint = "" if opts.jobs == "all" else "; finish the jobs in CVAT, or pull with --jobs all"
            raise PullError(f"task {task_id} ({report.name}) has no {opts.jobs if opts.jobs != 'all' else ''} jobs "
                            f"(jobs: {_describe_states(jobs) or 'none'}){hint}")
        final = task_dir(out, task_id)
        previous = read_provenance(final)
        signature = {"updated_date": task.get("updated_date"), "jobs": job_signature(jobs), "filter": opts.jobs,
                     "via": opts.via, "export_format": opts.export_format if opts.via == "export" else None,
                     "names": NAMES}
        if previous and previous.get("signature") == signature and self._intact(final, previous):
            report.status = "unchanged"
            report.frames = len(previous.get("frames", []))
            report.shapes = Counter(previous.get("shapes", {}))
            report.out_dir = str(final)
            log.info("task %d (%s): unchanged since %s", task_id, report.name, previous.get("pulled_at"))
            return

        task_labels = list(client.paginate("/api/labels", {"task_id": task_id}, what=f"labels of {what}"))
        labels = label_names_of(task_id, task_labels)
        meta = client.get_json(f"/api/tasks/{task_id}/data/meta", what=f"frame list of {what}")
        frames_meta, deleted = check_meta(task_id, size, meta)
        numbers: list[int] = []
        in_admitted: set[int] = set()
        for job in chosen:  # start/stop checked against the task's size by check_task
            in_admitted.update(range(job["start_frame"], job["stop_frame"] + 1))
        for frame_no in range(len(frames_meta)):  # frame numbers are 0-based positions in data/meta's frames
            if frame_no in deleted:
                report.skipped_frames["deleted in CVAT"] += 1
            elif frame_no not in in_admitted:
                report.skipped_frames[f"in jobs that are not {opts.jobs}"] += 1
            else:
                numbers.append(frame_no)
        if not numbers:
            raise PullError(f"task {task_id}: every frame of the admitted jobs is deleted; nothing to pull")
        names = frame_names(task_id, frames_meta, numbers)  # frame number -> file name below images/

        if opts.via == "export":
            if opts.export_format not in EXPORT_FORMATS:
                raise PullError(f"--format must be one of {EXPORT_FORMATS}, not {opts.export_format!r}")
            out.mkdir(parents=True, exist_ok=True)
            self._export_tmp = Path(tempfile.mkdtemp(prefix=f".export-task-{task_id}-", dir=out))
            instances, export_images, bad = self._via_export(task_id, frames_meta, names, set(numbers),
                                                             self._export_tmp, report)
            numbers = [n for n in numbers if n not in bad]
            if not numbers:
                raise PullError(f"task {task_id}: no frame of the export is an image; nothing to pull")
        else:
            annotations = client.get_json(f"/api/tasks/{task_id}/annotations", what=f"annotations of {what}")
            if not isinstance(annotations, dict):
                raise PullError(f"{what}: the annotations the server sent are not a CVAT annotations object")
            converted = convert_annotations(annotations, labels, set(numbers),
                                            attribute_names=label_attribute_names(task_labels),
                                            frame_sizes={n: (frames_meta[n]["width"], frames_meta[n]["height"])
                                                         for n in numbers})
            instances, export_images = converted.frames, None
            report.skipped_shapes.update(converted.skipped)

        label_names = list(dict.fromkeys(labels.values()))
        for frame_instances in instances.values():
            for inst in frame_instances:
                report.shapes[inst.label] += 1
                if opts.label_map is not None and not opts.label_map.is_known(inst.label):
                    report.unknown_labels[inst.label] += 1
        if report.unknown_labels:
            message = (f"task {task_id}: labels not in the trainer's label map: "
                       f"{dict(report.unknown_labels)}; add them as 'aliases' in your labels YAML "
                       f"(or to 'ignore'), or rename them in CVAT")
            if opts.strict_labels:
                raise PullError(message + " (--strict-labels: nothing written)")
            log.warning(message)
        report.out_dir = str(final)
        if opts.dry_run:
            report.status = "dry-run"
            report.frames = len(numbers)
            reusable = {f.get("name") for f in (previous or {}).get("frames", []) if isinstance(f, dict)}
            report.reused = sum(1 for n in numbers if names[n] in reusable)
            return

        data_key = json.dumps({"task": task_id, "chunks": meta.get("chunks_updated_date"), "names": NAMES,
                               "frames": [f.get("name") for f in frames_meta]})
        staging = Staging(out, task_id, data_key)
        records = self._fetch_frames(task_id, frames_meta, numbers, names, staging, previous, export_images, report)
        for record in records:
            record.instances = instances.get(int(record.frame_id or 0), [])
        dataset = AnnotatedDataset(images=records, labels=label_names, source=f"cvat task {task_id}")
        try:
            os.makedirs(staging.dir / "annotations", exist_ok=True)
            write_coco(dataset, staging.dir / "annotations" / "instances_default.json")
        except OSError as exc:
            raise StoreError(f"cannot write the annotations of task {task_id}: {exc}") from None
        about_version = client.server_version()
        provenance = {
            "format": FORMAT,
            "server": client.base,
            "server_version": about_version,
            "organization": client.settings.org,
            "task": {k: task.get(k) for k in ("id", "name", "updated_date", "size", "project_id", "mode",
                                               "organization", "segment_size")},
            "chunks_updated_date": meta.get("chunks_updated_date"),
            "jobs": [{**j, "admitted": admitted(j, opts.jobs)} for j in job_signature(jobs)],
            "jobs_filter": opts.jobs,
            "via": opts.via,
            "export_format": opts.export_format if opts.via == "export" else None,
            "labels": {str(k): v for k, v in labels.items()},
            "label_map": None if opts.label_map is None else opts.label_map.to_dict(),
            "unknown_labels": dict(report.unknown_labels),
            "frames": [{"number": r.frame_id, "name": r.name, "cvat_name": frames_meta[int(r.frame_id or 0)]["name"],
                        "width": r.width, "height": r.height,
                        "sha256": staging.frames[r.name]["sha256"], "bytes": staging.frames[r.name]["bytes"],
                        "shapes": len(r.instances)} for r in records],
            "shapes": dict(report.shapes),
            "skipped_frames": dict(report.skipped_frames),
            "skipped_shapes": dict(report.skipped_shapes),
            "signature": signature,
            "pulled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool": "cvat_sync 0.1",
        }
        staging.write_json(PROVENANCE, provenance)
        staging.commit(out, keep={r.name for r in records})
        report.status = "pulled"
        report.frames = len(records)
        log.info("task %d (%s): %d frames (%d downloaded, %d reused), %d shapes -> %s", task_id, report.name,
                 len(records), report.downloaded, report.reused, sum(report.shapes.values()), final)

    # --- pieces -------------------------------------------------------------------------------

    @staticmethod
    def _intact(final: Path, provenance: dict) -> bool:
        """The dataset on disk is complete (every frame there, inside it, with its recorded size)."""
        if not (final / "annotations" / "instances_default.json").is_file():
            return False
        for frame in provenance.get("frames", []):
            name = frame.get("name") if isinstance(frame, dict) else None
            try:
                if frame_file_name(name) != name:  # written before names were normalised: rewrite it
                    return False
            except UnsafeFrameName:
                return False
            path = final / "images" / name
            if path.is_symlink() or not path.is_file() or path.stat().st_size != frame.get("bytes"):
                return False
        return True

    def _fetch_frames(self, task_id: int, frames_meta: list[dict], numbers: list[int], names: dict[int, str],
                      staging: Staging, previous: dict | None, export_images: dict[int, Path] | None,
                      report: TaskReport) -> list[ImageRecord]:
        """Every frame in ``numbers`` into ``staging`` as ``images/<names[n]>``: reused when verified, taken
        from the export, else downloaded in parallel."""
        old: dict[str, dict] = {}
        for frame in (previous or {}).get("frames", []):
            name = frame.get("name") if isinstance(frame, dict) else None
            try:
                if frame_file_name(name) == name:
                    old[name] = frame
            except UnsafeFrameName:
                continue
        final = task_dir(self.opts.out, task_id)
        todo: list[int] = []
        for n in numbers:
            name = names[n]
            reusable = staging.has_valid(name) or (  # left by an interrupted pull of the same task data
                name in old and staging.add_existing(name, final / "images" / name, old[name]["sha256"]))
            if reusable:
                report.reused += 1
            elif export_images is not None and n in export_images:
                staging.add_bytes(name, export_images[n].read_bytes())
                report.downloaded += 1
            else:
                todo.append(n)
        bad: dict[int, str] = {}
        if todo:
            def fetch(n: int) -> tuple[int, bytes]:
                return n, self.client.get_bytes(f"/api/tasks/{task_id}/data",
                                                {"type": "frame", "number": n, "quality": "original"},
                                                what=f"frame {n} of task {task_id}")

            workers = max(1, min(self.opts.workers, len(todo)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="frames") as pool, \
                    tqdm(total=len(todo), desc=f"task {task_id} frames", unit="frame",
                         disable=not self.opts.progress) as bar:
                futures = [pool.submit(fetch, n) for n in todo]
                try:
                    for future in as_completed(futures):
                        n, data = future.result()
                        if _is_image(data) is None:
                            bad[n] = f"{n} ({names[n]}, {len(data)} bytes)"
                        else:
                            staging.add_bytes(names[n], data)
                            report.downloaded += 1
                            report.image_bytes += len(data)
                        bar.update(1)
                except TooLarge:  # a hostile answer: keep nothing of this pull (not even frames for resuming)
                    for f in futures:
                        f.cancel()
                    pool.shutdown(wait=True)
                    shutil.rmtree(staging.dir, ignore_errors=True)
                    raise
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        if bad:
            listed = ", ".join(bad[n] for n in sorted(bad)[:5])
            message = f"task {task_id}: {len(bad)} frame(s) are not images: {listed}"
            if not self.opts.skip_bad_frames:
                raise PullError(message + "; fix them in CVAT, or pull with --skip-bad-frames to leave them out "
                                "(frames already downloaded are kept for the next run)")
            log.warning("%s; left out (--skip-bad-frames)", message)
            report.skipped_frames["not an image"] += len(bad)
        return [ImageRecord(name=names[n], width=frames_meta[n]["width"], height=frames_meta[n]["height"],
                            path=staging.path_of(names[n]), frame_id=n) for n in numbers if n not in bad]

    def _via_export(self, task_id: int, frames_meta: list[dict], names: dict[int, str], numbers: set[int],
                    tmp: Path, report: TaskReport
                    ) -> tuple[dict[int, list[Instance]], dict[int, Path], set[int]]:
        """From a CVAT dataset export zip: instances per frame number, the frames' image files (extracted into
        ``tmp`` under names of our own) and the frames that are not images (left out with --skip-bad-frames,
        else refused). The zip is read through :class:`ExportZip` (size and ratio limits, no stored paths)."""
        from wbc_core.data.loader import read_any

        opts = self.opts
        zip_path = tmp / "export.zip"
        download_export(self.client, task_id, opts.export_format, zip_path, poll_s=opts.export_poll_s,
                        max_bytes=opts.max_export_bytes + (opts.max_export_bytes >> 6) + (1 << 20))
        with ExportZip(zip_path, task_id, opts.max_export_bytes, opts.max_export_ratio) as ez:
            root = tmp / "x"
            (root / "annotations").mkdir(parents=True)
            files = [ez.extract(info, root / ("annotations" if name.startswith("instances_") else "") / name)
                     for info, name in ez.annotation_members(opts.export_format)]
            check_export_frame_sizes(task_id, files)
            try:
                dataset = read_any(root if opts.export_format == "COCO 1.0" else files[0])
            except DatasetError as exc:
                raise PullError(f"task {task_id}: the export's annotations cannot be read ({exc}); nothing was "
                                "written") from None
            by_raw = {f.get("name"): i for i, f in enumerate(frames_meta) if isinstance(f.get("name"), str)}
            by_name = {name: n for n, name in names.items()}
            instances: dict[int, list[Instance]] = {}
            for record in dataset.images:  # record.path is ignored: frames come from the zip, by name
                n = by_raw.get(record.name)
                if n is None:
                    try:
                        n = by_name.get(frame_file_name(record.name))
                    except UnsafeFrameName:
                        n = None
                if n is None:
                    report.skipped_frames["in the export but not in the task's frame list"] += 1
                    continue
                if n not in numbers:
                    continue
                if n in instances:
                    raise PullError(f"task {task_id}: the export lists frame {n} ({frames_meta[n]['name']!r}) twice; "
                                    "nothing was written")
                if (record.width, record.height) != (frames_meta[n]["width"], frames_meta[n]["height"]):
                    raise PullError(f"task {task_id}: the export says frame {n} ({frames_meta[n]['name']!r}) is "
                                    f"{record.width}x{record.height}, the frame list says "
                                    f"{frames_meta[n]['width']}x{frames_meta[n]['height']}; nothing was written")
                instances[n] = list(record.instances)
            members = ez.image_members(opts.export_format)
            images: dict[int, Path] = {}
            bad: dict[int, str] = {}
            (tmp / "frames").mkdir()
            for n in sorted(numbers):
                found = members.get(names[n], [])
                if not found:
                    continue  # not in the export: downloaded over the API
                if len(found) > 1:
                    raise PullError(f"task {task_id}: the export holds {len(found)} files for frame {n} "
                                    f"({frames_meta[n]['name']!r}): {[i.filename for i in found]}; nothing was "
                                    "written")
                path = ez.extract(found[0], tmp / "frames" / f"{n}.bin")
                data = path.read_bytes()
                if _is_image(data) is None:
                    bad[n] = f"{n} ({names[n]}, {len(data)} bytes)"
                    path.unlink()
                else:
                    images[n] = path
        if bad:
            listed = ", ".join(bad[n] for n in sorted(bad)[:5])
            message = f"task {task_id}: {len(bad)} frame(s) of the export are not images: {listed}"
            if not opts.skip_bad_frames:
                raise PullError(message + "; fix them in CVAT, or pull with --skip-bad-frames to leave them out "
                                "(nothing was written)")
            log.warning("%s; left out (--skip-bad-frames)", message)
            report.skipped_frames["not an image"] += len(bad)
        return instances, images, set(bad)


# --- checks on what the server says --------------------------------------------------------------

def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print: control characters shown escaped (a task name cannot drive the terminal)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


def check_task(task_id: int, task: dict, jobs: list) -> int:
    """The task's size in frames, after checking it and every job's frame range against it; a number the
    server should never send (a ``stop_frame`` of 1e10, a negative ``start_frame``, a job of another task)
    is a :class:`PullError` naming the job and the value, before anything is written."""
    size = task.get("size")
    if not _is_int(size) or not 0 < size <= MAX_TASK_FRAMES:
        raise PullError(f"task {task_id}: the server says the task has {size!r} frames, not a number of frames "
                        f"this tool accepts (1..{MAX_TASK_FRAMES}); nothing was written")
    for job in jobs:
        if not isinstance(job, dict):
            raise PullError(f"task {task_id}: the job list holds {printable(repr(job))}, not a job; nothing was "
                            "written")
        jid = job.get("id")
        if not _is_int(jid):
            raise PullError(f"task {task_id}: a job has the id {jid!r}; nothing was written")
        if "task_id" in job and job["task_id"] != task_id:
            raise PullError(f"task {task_id}: job {jid} belongs to task {job['task_id']!r}; nothing was written")
        for key in ("start_frame", "stop_frame"):
            value = job.get(key)
            if not _is_int(value) or not 0 <= value < size:
                raise PullError(f"task {task_id}: job {jid} has {key} {value!r}, which is not a frame of the task "
                                f"(0..{size - 1}); the server sent an impossible job, nothing was written")
        if job["start_frame"] > job["stop_frame"]:
            raise PullError(f"task {task_id}: job {jid} starts at frame {job['start_frame']}, after its stop_frame "
                            f"{job['stop_frame']}; nothing was written")
    return size


def check_meta(task_id: int, size: int, meta: object) -> tuple[list[dict], set[int]]:
    """``data/meta``'s frame list and deleted frames, checked against the task's size: one entry per frame,
    each a positive ``width`` x ``height`` of at most :data:`MAX_FRAME_PIXELS`, deleted frames in range."""
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or len(frames) != size:
        count = len(frames) if isinstance(frames, list) else "no"
        raise PullError(f"task {task_id}: the frame list (data/meta) has {count} entries, but the task has {size} "
                        "frames (a video task? cvat_sync pulls image tasks); nothing was written")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise PullError(f"task {task_id}: frame {i} of the frame list is {printable(repr(frame))}, not a frame; "
                            "nothing was written")
        width, height = frame.get("width"), frame.get("height")
        if not (_is_int(width) and _is_int(height)) or width < 1 or height < 1 or width * height > MAX_FRAME_PIXELS:
            raise PullError(f"task {task_id}: frame {i} ({printable(repr(frame.get('name')))}) is {width!r}x{height!r} "
                            f"pixels in the frame list, not a frame size this tool accepts (at most "
                            f"{MAX_FRAME_PIXELS} pixels); nothing was written")
    deleted = meta.get("deleted_frames") or []  # type: ignore[union-attr]
    if not isinstance(deleted, list) or not all(_is_int(f) and 0 <= f < size for f in deleted):
        raise PullError(f"task {task_id}: deleted_frames {printable(repr(deleted), 120)} are not frames of the task "
                        f"(0..{size - 1}); nothing was written")
    return frames, set(deleted)


def frame_names(task_id: int, frames_meta: list[dict], numbers: list[int]) -> dict[int, str]:
    """Frame number -> the file name it gets below ``images/`` (:func:`~cvat_sync.store.frame_file_name`).
    A name that cannot be a file (control characters, ``..``), and two frames that would share a file (``a.jpg``
    and ``./a.jpg``) or a file and a folder (``a.jpg`` and ``a.jpg/b.jpg``), are refused: renaming is the
    user's call, in CVAT."""
    names: dict[int, str] = {}
    owner: dict[str, int] = {}
    for n in numbers:
        raw = frames_meta[n].get("name")
        try:
            name = frame_file_name(raw)
        except UnsafeFrameName as exc:
            raise PullError(f"task {task_id}: frame {n}: {exc}; rename it in CVAT (nothing was written)") from None
        if name in owner:
            m = owner[name]
            raise PullError(f"task {task_id}: frames {m} ({frames_meta[m]['name']!r}) and {n} ({raw!r}) would both be "
                            f"written as images/{name}; rename one of them in CVAT (nothing was written)")
        owner[name] = n
        names[n] = name
    for name, n in owner.items():
        parts = name.split("/")
        for k in range(1, len(parts)):
            folder = "/".join(parts[:k])
            if folder in owner:
                m = owner[folder]
                raise PullError(f"task {task_id}: frame {m} ({frames_meta[m]['name']!r}) is a file where frame {n} "
                                f"({frames_meta[n]['name']!r}) needs the folder images/{folder}/; rename one of them "
                                "in CVAT (nothing was written)")
    return names


def label_names_of(task_id: int, task_labels: list) -> dict[int, str]:
    labels: dict[int, str] = {}
    for lab in task_labels:
        if not isinstance(lab, dict) or not _is_int(lab.get("id")) or not isinstance(lab.get("name"), str):
            raise PullError(f"task {task_id}: the label list holds {printable(repr(lab), 120)}, not a label; "
                            "nothing was written")
        labels[lab["id"]] = lab["name"]
    return labels


def check_export_frame_sizes(task_id: int, files: list[Path]) -> None:
    """Every frame size an export's annotation files declare is a plausible frame (as :func:`check_meta`), before
    the annotations are decoded: mask runs are decoded at the frame's size."""
    for path in files:
        sizes: list[tuple[object, object, object]] = []
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_bytes())
                images = data.get("images") if isinstance(data, dict) else None
                for img in images if isinstance(images, list) else []:
                    if isinstance(img, dict):
                        sizes.append((img.get("file_name"), img.get("width"), img.get("height")))
            else:
                for _, elem in ElementTree.iterparse(path, events=("start",)):
                    if elem.tag == "image":
                        sizes.append((elem.get("name"), _int_or(elem.get("width")), _int_or(elem.get("height"))))
        except (ValueError, ElementTree.ParseError) as exc:
            raise PullError(f"task {task_id}: the export's {path.name} cannot be read ({exc}); nothing was written"
                            ) from None
        for name, width, height in sizes:
            if _is_int(width) and _is_int(height) and not 1 <= width * height <= MAX_FRAME_PIXELS:  # type: ignore
                raise PullError(f"task {task_id}: the export says frame {printable(repr(name))} is {width}x{height} "
                                "pixels, not a frame size this tool accepts; nothing was written")


def _int_or(text: str | None) -> object:
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return text


def pull_tasks(client: CvatClient, task_ids: list[int], options: PullOptions) -> list[TaskReport]:
    """Pull each task; a failing task stops the run (its previous dataset is left as it was)."""
    puller = Puller(client, options)
    return [puller.pull(task_id) for task_id in task_ids]


__all__ = ["EXPORT_FORMATS", "NotFound", "PullError", "PullOptions", "Puller", "TaskReport", "check_meta",
           "check_task", "frame_names", "pull_tasks", "sha256_file"]
