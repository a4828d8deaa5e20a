"""Which frames of a CVAT task the expert should correct next: ``python -m cvat_sync rank --task N --bundle B``.

Active learning for the correction loop (issue 14). Every frame of the task that has no annotation yet (and was
not queued by an earlier ranking) is downloaded, run through the same ``detect`` the function serves (plus a
mirrored pass), and scored by the per-frame uncertainty signals of :mod:`wbc_core.uncertainty`, weighed by how
typical the frame's cells are among the task's (:mod:`wbc_core.typicality`: score = uncertainty x
typicality ** density_power, so that the first corrections are not spent on outliers); the frames are written
highest score first (``ranking.json`` + ``ranking.csv`` in ``--out``).

**Making it actionable in CVAT**: ``--create-task K`` creates a new task holding the top K frames (the
original image bytes and names, the source task's labels, in the same project), ready for "Automatic
annotation" and correction. A new task rather than a tag or a job because CVAT 2.23 has no per-frame
"priority" field, a frame tag would be an annotation (pulled back as training data and shown as a label), jobs
cannot be re-cut after the task is made, and a ground-truth job is for quality control (its frames are kept out
of training). A task is what a lab can assign, track and mark completed, and what ``cvat_sync pull`` and
``trainer retrain`` already take. The frames sent to a task are recorded in ``queued.json`` in ``--out``, so
the next ranking skips them.

**Validation frames in every queue**: ``trainer retrain`` splits frames into train and validation by a hash of
their image bytes (:mod:`wbc_core.split`) and refuses to gate, so the expert's corrections wait, while no
validation frame exists. The uncertain frames a ranking puts first fall on either side by chance (on BCCD the
top ten were all training frames, and the first retrain was skipped). So each frame's side is computed here
with the same rule, and ``val_fraction`` of the K queued frames (at least one) are validation-side frames,
taken evenly spread over the ranking rather than from its top: the gate then judges a candidate on frames like
the ones it will serve, not on the hardest ones. ``--val-fraction 0`` queues the top K as they come.

Nothing is written when anything fails: a half-made task is deleted, the ranking files are written (atomically)
only at the end, and the retrain registry is never touched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cvat_sync.client import CvatClient, CvatError
from cvat_sync.pull import check_meta, check_task, label_names_of, printable
from cvat_sync.store import sha256_bytes
from wbc_core.atomic import atomic_write_bytes
from wbc_core.data.images import decode_rgb
from wbc_core.detect import Predictor
from wbc_core.split import SALT, VAL, VAL_FRACTION, split_side, validation_slots
from wbc_core.typicality import DENSITY_POWER, frame_typicality
from wbc_core.uncertainty import DEFAULT_WEIGHTS, SIGNALS, FrameUncertainty, frame_uncertainty, scores

log = logging.getLogger(__name__)

RANKING_JSON = "ranking.json"
RANKING_CSV = "ranking.csv"
QUEUED_JSON = "queued.json"


class RankError(CvatError):
    """The task cannot be ranked (no frames, nothing unannotated, labels that do not match the bundle)."""

    exit_code = 1


@dataclass
class RankOptions:
    out: Path                               # ranking.json, ranking.csv, queued.json
    create_task: int = 0                    # > 0: a new CVAT task from the top K frames
    mirror: bool = True                     # the mirrored pass (flip_unmatched)
    threshold: float | None = None          # None: the bundle's served threshold
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    density_power: float = DENSITY_POWER    # how much typicality counts (0: uncertainty only)
    progress: bool = True
    task_name: str | None = None            # name of the created task (default: derived from the source task)
    # the retrain split (retrain.yaml's split.val_fraction and split.salt): that share of a created task's frames
    # are validation-side frames (0: the top K whatever their side)
    val_fraction: float = VAL_FRACTION
    salt: str = SALT

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction {self.val_fraction}: from 0 (top K only) to below 1, as "
                             "retrain.yaml's split.val_fraction")


@dataclass
class RankedFrame:
    frame: int
    name: str
    score: float
    signals: FrameUncertainty
    uncertainty: float | None = None        # the weighted signals (wbc_core.uncertainty.scores)
    typicality: float | None = None         # wbc_core.typicality.frame_typicality
    split: str | None = None                # the retrain side its image bytes give (wbc_core.split)

    def to_dict(self) -> dict[str, Any]:
        score = None if self.score == float("-inf") else round(self.score, 4)  # None: not an image
        return {"frame": self.frame, "name": self.name, "score": score,
                "uncertainty": None if self.uncertainty is None else round(self.uncertainty, 4),
                "typicality": self.typicality, "split": self.split, **self.signals.to_dict()}


def frames_to_queue(ranked: list[RankedFrame], k: int, val_fraction: float) -> list[RankedFrame]:
    """The ``k`` frames to queue from ``ranked`` (best first; unreadable frames never): the top-ranked
    training-side frames, plus :func:`wbc_core.split.validation_slots` validation-side frames spread evenly over
    the validation side's ranking (so the gate sees easy and hard frames alike). When one side runs short, the
    other's next frames fill in. Returned in ranking order."""
    readable = [r for r in ranked if r.score != float("-inf")]
    if val_fraction <= 0:
        return readable[:k]
    val = [r for r in readable if r.split == VAL]
    train = [r for r in readable if r.split != VAL]
    n_val = min(max(validation_slots(k, val_fraction), k - len(train)), len(val))
    picks = {id(val[int((i + 0.5) * len(val) / n_val)]) for i in range(n_val)} if n_val else set()
    picks |= {id(r) for r in train[:k - n_val]}
    return [r for r in readable if id(r) in picks]


def queued_frames(out: Path, task_id: int) -> set[str]:
    """Names of the frames of ``task_id`` that earlier rankings sent to a new task (``queued.json``)."""
    path = out / QUEUED_JSON
    if not path.is_file():
        return set()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RankError(f"{path} is not readable JSON ({exc}); move it away to rank every unannotated frame "
                        "again") from None
    entries = data.get(str(task_id), []) if isinstance(data, dict) else []
    return {name for entry in entries for name in entry.get("frames", [])}


def annotated_frames(annotations: object) -> set[int]:
    """Frames that carry any shape, tag or track in the task's annotations (CVAT's ``{tags, shapes, tracks}``)."""
    frames: set[int] = set()
    if not isinstance(annotations, dict):
        return frames
    for key in ("shapes", "tags"):
        for item in annotations.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("frame"), int):
                frames.add(item["frame"])
    for track in annotations.get("tracks") or []:
        for shape in (track.get("shapes") or []) if isinstance(track, dict) else []:
            if isinstance(shape, dict) and isinstance(shape.get("frame"), int) and not shape.get("outside"):
                frames.add(shape["frame"])
    return frames


def check_labels(task_id: int, task_labels: list[str], bundle_labels: list[str]) -> list[str]:
    """The bundle's labels the task has; none is an error (CVAT would drop every shape), some missing a warning."""
    shared = [name for name in bundle_labels if name in task_labels]
    if not shared:
        raise RankError(f"task {task_id}'s labels ({', '.join(task_labels) or 'none'}) include none of the bundle's "
                        f"({', '.join(bundle_labels)}): CVAT would drop every shape this model returns. Rank with a "
                        "bundle trained for this task's labels, or add them to the task")
    missing = [name for name in bundle_labels if name not in task_labels]
    if missing:
        log.warning("task %d has no label %s: cells the model names so would be dropped by CVAT", task_id,
                    ", ".join(repr(m) for m in missing))
    return shared


def rank_task(client: CvatClient, task_id: int, predictor: Predictor, options: RankOptions) -> dict[str, Any]:
    """Rank ``task_id``'s unannotated frames (most uncertain first); with ``options.create_task``, queue the top
    frames in a new CVAT task. Returns the ranking record that was written to ``options.out``."""
    t0 = time.perf_counter()
    what = f"task {task_id}"
    task = client.get_json(f"/api/tasks/{task_id}", what=what)
    if not isinstance(task, dict):
        raise RankError(f"{what}: the server's answer is not a task")
    name = printable(str(task.get("name", "")))
    if task.get("size") in (None, 0):
        raise RankError(f"task {task_id} ({name}) has no frames; upload images to it first (nothing written)")
    jobs = list(client.paginate("/api/jobs", {"task_id": task_id}, what=f"jobs of {what}"))
    size = check_task(task_id, task, jobs)
    labels = list(client.paginate("/api/labels", {"task_id": task_id}, what=f"labels of {what}"))
    label_names = label_names_of(task_id, labels)
    check_labels(task_id, list(label_names.values()), list(predictor.bundle.contract.labels))
    meta = client.get_json(f"/api/tasks/{task_id}/data/meta", what=f"frame list of {what}")
    frames_meta, deleted = check_meta(task_id, size, meta)
    annotated = annotated_frames(client.get_json(f"/api/tasks/{task_id}/annotations", what=f"annotations of {what}"))
    queued = queued_frames(options.out, task_id)
    todo = [n for n in range(size) if n not in deleted and n not in annotated
            and str(frames_meta[n].get("name")) not in queued]
    log.info("%s (%s): %d frames, %d annotated, %d already queued, %d deleted: ranking %d", what, name, size,
             len(annotated), sum(str(f.get("name")) in queued for f in frames_meta), len(deleted), len(todo))
    if not todo:
        raise RankError(f"task {task_id} ({name}): every frame is already annotated or queued by an earlier ranking "
                        f"({len(annotated)} annotated, {len(queued)} queued in {options.out / QUEUED_JSON}); "
                        "nothing to rank (nothing written)")

    ranked: list[RankedFrame] = []
    embeddings: dict[int, list[Any]] = {}
    for n in tqdm(todo, desc=f"ranking {what}", unit="frame", disable=not options.progress):
        data = client.get_bytes(f"/api/tasks/{task_id}/data", {"type": "frame", "number": n, "quality": "original"},
                                what=f"frame {n} of {what}")
        frame_name = str(frames_meta[n].get("name"))
        try:
            image, _ = decode_rgb(data, name=frame_name)
        except Exception as exc:  # a frame that is not an image: ranked last, said plainly
            log.warning("frame %d (%s) of %s is not a readable image (%s); ranked last", n, printable(frame_name),
                        what, exc)
            ranked.append(RankedFrame(n, frame_name, float("-inf"), FrameUncertainty()))
            continue
        detection, signals = frame_uncertainty(predictor, image, options.threshold, mirror=options.mirror)
        embeddings[n] = [c.embedding for c in detection.cells if c.embedding is not None]
        side = split_side(sha256_bytes(data), options.salt, options.val_fraction)
        ranked.append(RankedFrame(n, frame_name, 0.0, signals, split=side))
    readable = [r for r in ranked if r.score != float("-inf")]
    uncertain = scores([r.signals for r in readable], options.weights)
    typical = frame_typicality([embeddings[r.frame] for r in readable])
    for r, u, t in zip(readable, uncertain, typical, strict=True):
        r.uncertainty, r.typicality = u, t
        r.score = u * t ** options.density_power
    ranked.sort(key=lambda r: (-r.score, r.frame))

    record: dict[str, Any] = {
        "task": task_id, "task_name": name, "bundle": str(predictor.bundle.directory),
        "threshold": predictor.default_threshold if options.threshold is None else options.threshold,
        "signals": list(SIGNALS), "weights": dict(options.weights), "density_power": options.density_power,
        "mirror": options.mirror, "split": {"val_fraction": options.val_fraction, "salt": options.salt},
        "frames_ranked": len(ranked), "frames_annotated": len(annotated), "frames_queued_before": len(queued),
        "ranking": [r.to_dict() | {"rank": i + 1} for i, r in enumerate(ranked)],
    }
    if options.create_task > 0:
        top = frames_to_queue(ranked, options.create_task, options.val_fraction)
        val_queued = sum(r.split == VAL for r in top)
        if options.val_fraction > 0 and not val_queued and len(top) >= 2:
            log.warning("%s: none of the unannotated frames falls on the validation side; trainer retrain will "
                        "refuse to gate until a validation frame is corrected", what)
        record["created_task"] = create_task_from_frames(client, task, label_list(labels), top, options)
        record["created_task"]["validation_frames"] = val_queued
    record["seconds"] = round(time.perf_counter() - t0, 2)
    write_ranking(options.out, record)
    if record.get("created_task"):
        add_queued(options.out, task_id, record["created_task"])
    return record


def label_list(labels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's labels as a task-creation request wants them (name, type, colour, attributes)."""
    out = []
    for lab in labels:
        item = {"name": lab["name"], "type": lab.get("type") or "any"}
        if lab.get("color"):
            item["color"] = lab["color"]
        item["attributes"] = [{k: a[k] for k in ("name", "mutable", "input_type", "default_value", "values")
                               if k in a} for a in lab.get("attributes") or []]
        out.append(item)
    return out


def create_task_from_frames(client: CvatClient, source: dict[str, Any], labels: list[dict[str, Any]],
                            frames: list[RankedFrame], options: RankOptions) -> dict[str, Any]:
    """A new task with ``frames``' original bytes (same names, ranked order), the source's labels and project.
    A task that cannot be completed is deleted again."""
    sid = source["id"]
    if not frames:
        raise RankError(f"task {sid}: none of the top frames is a readable image; no task created")
    base = [r.name.rsplit("/", 1)[-1] for r in frames]
    clash = sorted({b for b in base if base.count(b) > 1})
    if clash:  # CVAT keeps only the part after the last '/', and same-named files overwrite each other
        raise RankError(f"task {sid}: the top frames include several named {', '.join(clash[:3])} (in different "
                        "folders); CVAT would keep only one of each in a new task. Rename them, or rank with "
                        "--create-task 0 and use the ranking file (nothing created)")
    name = options.task_name or f"{source.get('name', f'task {sid}')}: next {len(frames)} by uncertainty"
    project = source.get("project_id")
    files = []  # downloaded again: the top frames are known only once every frame is scored, and holding every
    # frame's bytes until then would cost a large task's whole size in memory
    for r, file_name in zip(frames, base, strict=True):
        files.append((file_name, client.get_bytes(
            f"/api/tasks/{sid}/data", {"type": "frame", "number": r.frame, "quality": "original"},
            what=f"frame {r.frame} of task {sid}")))
    created = client.create_task(name, None if project else labels, project_id=project)
    tid = created["id"]
    try:
        client.upload_task_images(tid, files, sorting_method="predefined")
    except BaseException:
        log.error("could not fill the new task %d; deleting it", tid)
        try:
            client.delete_task(tid)
        except CvatError as exc:
            log.error("could not delete the half-made task %d (%s): delete it in CVAT", tid, exc)
        raise
    log.info("created task %d (%s) with %d frames of task %d", tid, printable(name), len(files), sid)
    return {"id": tid, "name": name, "project_id": project, "frames": [r.name for r in frames],
            "source_frames": [r.frame for r in frames]}


def write_ranking(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / RANKING_JSON, (json.dumps(record, indent=1) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = ["rank", "frame", "name", "score", "uncertainty", "typicality", "split", "cells", *SIGNALS]
    writer.writerow(columns)
    for row in record["ranking"]:
        writer.writerow([row[c] for c in columns])
    atomic_write_bytes(out / RANKING_CSV, buf.getvalue().encode())


def add_queued(out: Path, task_id: int, created: dict[str, Any]) -> None:
    path = out / QUEUED_JSON
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(str(task_id), []).append({"task": created["id"], "frames": created["frames"]})
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
