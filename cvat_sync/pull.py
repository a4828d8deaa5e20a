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
import tempfile
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from cvat_sync.client import CvatClient, CvatError, NotFound
from cvat_sync.convert import convert_annotations, label_attribute_names
from cvat_sync.export import download_export
from cvat_sync.store import (
    FORMAT,
    PROVENANCE,
    Staging,
    StoreError,
    read_provenance,
    recover,
    sha256_file,
    task_dir,
    task_lock,
)
from wbc_core.data.coco import write_coco
from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance
from wbc_core.labels import LabelMap

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("COCO 1.0", "CVAT for images 1.1")


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

    # --- task list ----------------------------------------------------------------------------

    def project_tasks(self, project_id: int) -> list[int]:
        self.client.get_json(f"/api/projects/{project_id}", what=f"project {project_id}")
        ids = [int(t["id"]) for t in self.client.paginate("/api/tasks", {"project_id": project_id},
                                                          what=f"tasks of project {project_id}")]
        if not ids:
            raise PullError(f"project {project_id} has no tasks visible to you")
        return sorted(ids)

    # --- one task -----------------------------------------------------------------------------

    def pull(self, task_id: int) -> TaskReport:
        out = Path(self.opts.out)
        report = TaskReport(task_id=task_id)
        t0 = time.perf_counter()
        with task_lock(out, task_id):
            recover(out, task_id)
            self._pull_locked(task_id, out, report)
        report.seconds = round(time.perf_counter() - t0, 2)
        return report

    def _pull_locked(self, task_id: int, out: Path, report: TaskReport) -> None:
        client, opts = self.client, self.opts
        what = f"task {task_id}"
        task = client.get_json(f"/api/tasks/{task_id}", what=what)
        report.name = str(task.get("name", ""))
        if not task.get("size"):
            raise PullError(f"task {task_id} ({report.name}) has no images yet; nothing to pull")
        jobs = list(client.paginate("/api/jobs", {"task_id": task_id}, what=f"jobs of {what}"))
        chosen = [j for j in jobs if admitted(j, opts.jobs)]
        report.jobs = {"total": len(jobs), "admitted": len(chosen)}
        if not chosen:
            hint = "" if opts.jobs == "all" else "; finish the jobs in CVAT, or pull with --jobs all"
            raise PullError(f"task {task_id} ({report.name}) has no {opts.jobs if opts.jobs != 'all' else ''} jobs "
                            f"(jobs: {_describe_states(jobs) or 'none'}){hint}")
        final = task_dir(out, task_id)
        previous = read_provenance(final)
        signature = {"updated_date": task.get("updated_date"), "jobs": job_signature(jobs), "filter": opts.jobs,
                     "via": opts.via, "export_format": opts.export_format if opts.via == "export" else None}
        if previous and previous.get("signature") == signature and self._intact(final, previous):
            report.status = "unchanged"
            report.frames = len(previous.get("frames", []))
            report.shapes = Counter(previous.get("shapes", {}))
            report.out_dir = str(final)
            log.info("task %d (%s): unchanged since %s", task_id, report.name, previous.get("pulled_at"))
            return

        task_labels = list(client.paginate("/api/labels", {"task_id": task_id}, what=f"labels of {what}"))
        labels = {int(lab["id"]): str(lab["name"]) for lab in task_labels}
        meta = client.get_json(f"/api/tasks/{task_id}/data/meta", what=f"frame list of {what}")
        frames_meta = meta.get("frames") or []
        deleted = {int(f) for f in meta.get("deleted_frames") or []}
        start = int(meta.get("start_frame", 0) or 0)
        numbers: list[int] = []
        in_admitted = set()
        for job in chosen:
            in_admitted.update(range(int(job["start_frame"]), int(job["stop_frame"]) + 1))
        for number in range(len(frames_meta)):
            frame_no = number  # frame numbers are 0-based positions in data/meta's frame list
            if frame_no in deleted:
                report.skipped_frames["deleted in CVAT"] += 1
            elif frame_no not in in_admitted:
                report.skipped_frames[f"in jobs that are not {opts.jobs}"] += 1
            else:
                numbers.append(frame_no)
        del start
        if not numbers:
            raise PullError(f"task {task_id}: every frame of the admitted jobs is deleted; nothing to pull")

        if opts.via == "export":
            instances, export_images = self._via_export(task_id, task, frames_meta, set(numbers), report)
        else:
            annotations = client.get_json(f"/api/tasks/{task_id}/annotations", what=f"annotations of {what}")
            converted = convert_annotations(annotations, labels, set(numbers),
                                            attribute_names=label_attribute_names(task_labels))
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
            reusable = {f["name"] for f in (previous or {}).get("frames", [])}
            report.reused = sum(1 for n in numbers if frames_meta[n]["name"] in reusable)
            return

        data_key = json.dumps({"task": task_id, "chunks": meta.get("chunks_updated_date"),
                               "frames": [f.get("name") for f in frames_meta]})
        staging = Staging(out, task_id, data_key)
        records = self._fetch_frames(task_id, frames_meta, numbers, staging, previous, export_images, report)
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
            "frames": [{"number": r.frame_id, "name": r.name, "width": r.width, "height": r.height,
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
        """The dataset on disk is complete (every frame there with its recorded size)."""
        if not (final / "annotations" / "instances_default.json").is_file():
            return False
        for frame in provenance.get("frames", []):
            path = final / "images" / frame["name"]
            if not path.is_file() or path.stat().st_size != frame["bytes"]:
                return False
        return True

    def _fetch_frames(self, task_id: int, frames_meta: list[dict], numbers: list[int], staging: Staging,
                      previous: dict | None, export_images: dict[str, Path] | None, report: TaskReport
                      ) -> list[ImageRecord]:
        """Every frame in ``numbers`` into ``staging``: reused when verified, else downloaded in parallel."""
        old = {f["name"]: f for f in (previous or {}).get("frames", [])}
        final = task_dir(self.opts.out, task_id)
        todo: list[int] = []
        for n in numbers:
            name = frames_meta[n]["name"]
            reusable = staging.has_valid(name) or (  # left by an interrupted pull of the same task data
                name in old and staging.add_existing(name, final / "images" / name, old[name]["sha256"]))
            if reusable:
                report.reused += 1
            elif export_images is not None and name in export_images:
                staging.add_bytes(name, export_images[name].read_bytes())
                report.downloaded += 1
            else:
                todo.append(n)
        bad: list[str] = []
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
                        name = frames_meta[n]["name"]
                        if _is_image(data) is None:
                            bad.append(f"{n} ({name}, {len(data)} bytes)")
                        else:
                            staging.add_bytes(name, data)
                            report.downloaded += 1
                            report.image_bytes += len(data)
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        if bad:
            message = f"task {task_id}: {len(bad)} frame(s) are not images: {', '.join(bad[:5])}"
            if not self.opts.skip_bad_frames:
                raise PullError(message + "; fix them in CVAT, or pull with --skip-bad-frames to leave them out "
                                "(frames already downloaded are kept for the next run)")
            log.warning("%s; left out (--skip-bad-frames)", message)
            report.skipped_frames["not an image"] += len(bad)
        bad_names = {b.split(" (", 1)[1].split(",", 1)[0] for b in bad}
        records = []
        for n in numbers:
            name = frames_meta[n]["name"]
            if name in bad_names:
                continue
            records.append(ImageRecord(name=name, width=int(frames_meta[n]["width"]),
                                       height=int(frames_meta[n]["height"]), path=staging.path_of(name),
                                       frame_id=n))
        return records

    def _via_export(self, task_id: int, task: dict, frames_meta: list[dict], numbers: set[int],
                    report: TaskReport) -> tuple[dict[int, list[Instance]], dict[str, Path]]:
        """Instances per frame number and extracted frame files, from a CVAT dataset export zip."""
        from wbc_core.data.loader import read_any

        if self.opts.export_format not in EXPORT_FORMATS:
            raise PullError(f"--format must be one of {EXPORT_FORMATS}, not {self.opts.export_format!r}")
        tmp = Path(tempfile.mkdtemp(prefix=f".export-task-{task_id}-", dir=self.opts.out))
        self._export_tmp = tmp
        zip_path = tmp / "export.zip"
        download_export(self.client, task_id, self.opts.export_format, zip_path, poll_s=self.opts.export_poll_s)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.testzip()
        except zipfile.BadZipFile as exc:
            raise CvatError(f"task {task_id}: the export is not a valid zip ({exc}); run the pull again") from None
        dataset = read_any(zip_path, extract_dir=tmp / "x")
        by_name = {f["name"]: i for i, f in enumerate(frames_meta)}
        instances: dict[int, list[Instance]] = {}
        images: dict[str, Path] = {}
        for record in dataset.images:
            n = by_name.get(record.name)
            if n is None:
                report.skipped_frames["in the export but not in the task's frame list"] += 1
                continue
            if n not in numbers:
                continue
            instances[n] = list(record.instances)
            if record.path is not None and Path(record.path).is_file():
                images[record.name] = Path(record.path)
        return instances, images


def pull_tasks(client: CvatClient, task_ids: list[int], options: PullOptions) -> list[TaskReport]:
    """Pull each task; a failing task stops the run (its previous dataset is left as it was)."""
    puller = Puller(client, options)
    reports = []
    for task_id in task_ids:
        try:
            reports.append(puller.pull(task_id))
        finally:
            tmp = getattr(puller, "_export_tmp", None)
            if tmp is not None:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
                puller._export_tmp = None
    return reports


__all__ = ["EXPORT_FORMATS", "NotFound", "PullError", "PullOptions", "Puller", "TaskReport", "pull_tasks",
           "sha256_file"]
