"""In-memory CVAT 2.23.1 state (users, organizations, projects, tasks, jobs, labels, shapes, export requests)
and its JSON representations, field for field as the real server writes them (see the captures' README).

All mutating methods take the state's re-entrant lock, so a test may change the state while the HTTP server
answers requests. Timestamps come from a strictly increasing UTC clock.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

JOB_STATES = ("new", "in progress", "completed", "rejected")
JOB_STAGES = ("annotation", "validation", "acceptance")
SHAPE_TYPES = ("rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton")
CHUNK_SIZE = 72


class StateError(ValueError):
    """A builder call was given something the stand-in (or CVAT) would not accept."""


def iso(dt: datetime | None) -> str | None:
    """CVAT's JSON date format: ``2026-11-26T16:45:32.482543Z``."""
    return None if dt is None else dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def legacy_status(stage: str, state: str) -> str:
    """The derived legacy job ``status`` (README quirk 9)."""
    if stage == "annotation":
        return "annotation"
    if stage == "acceptance" and state == "completed":
        return "completed"
    return "validation"


@dataclass
class User:
    id: int
    username: str
    password: str
    token: str
    admin: bool = False
    email: str = ""
    first_name: str = ""
    last_name: str = ""
    date_joined: datetime | None = None
    last_login: datetime | None = None
    access_tokens: list[str] = field(default_factory=list)


@dataclass
class Org:
    id: int
    slug: str
    name: str
    owner_id: int
    members: set[int] = field(default_factory=set)


@dataclass
class Label:
    id: int
    name: str
    color: str
    type: str
    attributes: list[dict[str, Any]]
    task_id: int | None = None
    project_id: int | None = None


@dataclass
class Frame:
    name: str
    data: bytes
    width: int
    height: int
    compressed: bytes | None = None


@dataclass
class Project:
    id: int
    name: str
    owner_id: int
    org_id: int | None
    labels: list[Label]
    created: datetime
    updated: datetime
    assignee_id: int | None = None


@dataclass
class Job:
    id: int
    task_id: int
    start_frame: int
    stop_frame: int
    created: datetime
    updated: datetime
    state: str = "new"
    stage: str = "annotation"
    assignee_id: int | None = None


@dataclass
class Task:
    id: int
    name: str
    owner_id: int
    org_id: int | None
    project_id: int | None
    labels: list[Label]
    frames: list[Frame]
    segment_size: int
    overlap: int | None
    image_quality: int
    data_id: int | None
    created: datetime
    updated: datetime
    chunks_updated: datetime | None
    jobs: list[int] = field(default_factory=list)
    shapes: list[dict[str, Any]] = field(default_factory=list)
    deleted_frames: list[int] = field(default_factory=list)
    assignee_id: int | None = None
    subset: str = ""
    status: str = "annotation"

    @property
    def has_data(self) -> bool:
        return bool(self.frames)


@dataclass
class ExportRequest:
    rq_id: str
    task_id: int
    format: str
    save_images: bool
    user_id: int
    created: datetime
    polls: int = 0
    started: datetime | None = None
    finished: datetime | None = None
    fail_message: str | None = None
    failed: bool = False
    zip_bytes: bytes | None = None
    filename: str = ""

    @property
    def done(self) -> bool:
        return self.finished is not None


@dataclass
class CreateRequest(ExportRequest):
    """The ``create:task-<id>`` request of ``POST /api/tasks/{id}/data``: the uploaded files wait here until the
    request is polled to completion (the same polling model as exports), then become the task's frames."""

    files: list[tuple[str, bytes]] = field(default_factory=list, repr=False)
    image_quality: int = 70
    sorting_method: str = "lexicographical"
    project_id: int | None = None


class CvatState:
    """The stand-in's data and the builder API (see the package docstring for the full list)."""

    def __init__(self, version: str = "2.23.1", seed: int = 0, export_polls: int = 1) -> None:
        self.lock = threading.RLock()
        self.version = version
        self.seed = seed
        self.export_polls = export_polls
        self.users: dict[int, User] = {}
        self.orgs: dict[int, Org] = {}
        self.projects: dict[int, Project] = {}
        self.tasks: dict[int, Task] = {}
        self.jobs: dict[int, Job] = {}
        self.requests: dict[str, ExportRequest] = {}
        self._shape_ids = 0
        self._high_ids: dict[str, int] = {}
        self._label_ids = 0
        self._data_ids = 0
        self._last_time = datetime(2000, 1, 1, tzinfo=timezone.utc)

    # --- clock and ids -------------------------------------------------------------------------------

    def now(self) -> datetime:
        """A strictly increasing UTC timestamp (two changes never share an ``updated_date``)."""
        with self.lock:
            t = datetime.now(timezone.utc)
            if t <= self._last_time:
                t = self._last_time + timedelta(microseconds=1)
            self._last_time = t
            return t

    def _next_id(self, existing: Any, wanted: int | None, what: str) -> int:
        """``wanted``, or one more than the highest id of its kind ever given: as with CVAT's database sequences,
        the id of a deleted task (or job, ...) is not handed out again."""
        if wanted is not None:
            if wanted in existing:
                raise StateError(f"{what} id {wanted} is already used")
            new = int(wanted)
        else:
            new = max(max(existing, default=0), self._high_ids.get(what, 0)) + 1
        self._high_ids[what] = max(self._high_ids.get(what, 0), new)
        return new

    def _token(self, username: str, salt: str = "key") -> str:
        return hashlib.sha1(f"{self.seed}:{salt}:{username}".encode()).hexdigest()

    # --- users and organizations --------------------------------------------------------------------

    def add_user(self, username: str, password: str, admin: bool = False, *, email: str | None = None,
                 first_name: str = "", last_name: str = "", id: int | None = None) -> str:
        """Create a user; returns its legacy API key (``Authorization: Token <key>``)."""
        with self.lock:
            if any(u.username == username for u in self.users.values()):
                raise StateError(f"user {username!r} already exists")
            uid = self._next_id(self.users, id, "user")
            user = User(id=uid, username=username, password=password, token=self._token(username), admin=admin,
                        email=email if email is not None else f"{username}@localhost.localdomain",
                        first_name=first_name, last_name=last_name, date_joined=self.now())
            self.users[uid] = user
            return user.token

    def add_access_token(self, username: str) -> str:
        """A Personal Access Token for ``Authorization: Bearer`` (accepted only with ``version >= 2.32.0``)."""
        with self.lock:
            user = self.user_by_name(username)
            token = self._token(username, f"pat{len(user.access_tokens)}")
            user.access_tokens.append(token)
            return token

    def user_by_name(self, username: str) -> User:
        for user in self.users.values():
            if user.username == username:
                return user
        raise StateError(f"no user {username!r}")

    def token_of(self, username: str) -> str:
        return self.user_by_name(username).token

    def add_org(self, slug: str, name: str | None = None, owner: str | None = None,
                members: tuple[str, ...] | list[str] = (), id: int | None = None) -> int:
        """Create an organization (``X-Organization: <slug>``); ``members`` are user names."""
        with self.lock:
            if any(o.slug == slug for o in self.orgs.values()):
                raise StateError(f"organization {slug!r} already exists")
            oid = self._next_id(self.orgs, id, "organization")
            owner_user = self.user_by_name(owner) if owner else self._default_owner()
            ids = {owner_user.id} | {self.user_by_name(m).id for m in members}
            self.orgs[oid] = Org(id=oid, slug=slug, name=name or slug, owner_id=owner_user.id, members=ids)
            return oid

    def org_by_slug(self, slug: str) -> Org | None:
        for org in self.orgs.values():
            if org.slug == slug:
                return org
        return None

    def _org_id(self, org: str | int | None) -> int | None:
        if org is None:
            return None
        if isinstance(org, int):
            if org not in self.orgs:
                raise StateError(f"no organization with id {org}")
            return org
        found = self.org_by_slug(org)
        if found is None:
            raise StateError(f"no organization {org!r}; add it with add_org() first")
        return found.id

    def _default_owner(self) -> User:
        admins = [u for u in self.users.values() if u.admin]
        if admins:
            return min(admins, key=lambda u: u.id)
        if self.users:
            return self.users[min(self.users)]
        raise StateError("add a user first (the owner of tasks and projects)")

    def _owner(self, owner: str | None) -> User:
        return self.user_by_name(owner) if owner else self._default_owner()

    # --- labels -------------------------------------------------------------------------------------

    def _make_labels(self, specs: list[dict[str, Any]] | list[str], task_id: int | None,
                     project_id: int | None) -> list[Label]:
        labels: list[Label] = []
        used = {lbl.id for t in self.tasks.values() for lbl in t.labels}
        used |= {lbl.id for p in self.projects.values() for lbl in p.labels}
        for index, spec in enumerate(specs):
            if isinstance(spec, str):
                spec = {"name": spec}
            if "id" in spec and spec["id"] is not None:
                lid = int(spec["id"])
                if lid in used:
                    raise StateError(f"label id {lid} is already used")
            else:
                lid = max(used | {self._label_ids}) + 1
            used.add(lid)
            self._label_ids = max(self._label_ids, lid)
            attrs = []
            for a_index, attr in enumerate(spec.get("attributes", [])):
                attrs.append({"id": int(attr.get("id", lid * 100 + a_index)), "name": attr["name"],
                              "mutable": bool(attr.get("mutable", False)),
                              "input_type": attr.get("input_type", "text"),
                              "default_value": str(attr.get("default_value", "")),
                              "values": [str(v) for v in attr.get("values", [])]})
            labels.append(Label(id=lid, name=str(spec["name"]), color=spec.get("color") or _color(index),
                                type=str(spec.get("type", "any")), attributes=attrs, task_id=task_id,
                                project_id=project_id))
        names = [lbl.name for lbl in labels]
        if len(set(names)) != len(names):
            raise StateError(f"label names must be unique, got {names}")
        return labels

    def task_labels(self, task: Task) -> list[Label]:
        """The labels a task uses: its project's when it is in a project."""
        if task.project_id is not None:
            return self.projects[task.project_id].labels
        return task.labels

    # --- projects and tasks -------------------------------------------------------------------------

    def add_project(self, name: str, labels: list[dict[str, Any]] | list[str] | None = None,
                    org: str | int | None = None, id: int | None = None,
                    owner: str | None = None) -> int:
        """Create a project with its own labels (``[{"name", "type", "color"?, "id"?, "attributes"?}]``)."""
        with self.lock:
            pid = self._next_id(self.projects, id, "project")
            now = self.now()
            project = Project(id=pid, name=name, owner_id=self._owner(owner).id, org_id=self._org_id(org),
                              labels=[], created=now, updated=now)
            project.labels = self._make_labels(labels or [], None, pid)
            self.projects[pid] = project
            return pid

    def add_task(self, name: str, frames: list[tuple[str, bytes]] | None = None,
                 labels: list[dict[str, Any]] | list[str] | None = None, project_id: int | None = None,
                 segment_size: int | None = None, org: str | int | None = None,
                 id: int | None = None, owner: str | None = None,
                 job_ids: list[int] | None = None, image_quality: int = 70, data_id: int | None = None,
                 assignee: str | None = None, overlap: int | None = None) -> int:
        """Create a task with its frames (``[(file name, image bytes)]``, served byte for byte as ``original``)
        and its jobs: one per ``segment_size`` frames (0/None: one job), ids from ``job_ids`` when given.

        ``labels`` is ignored for a task in a project (it uses the project's labels, like CVAT). With no frames
        the task looks like one created but never given data (``mode: ""``, no ``size``; ``segment_size`` and
        ``overlap`` as given, 0 and null by default); :meth:`attach_data` gives it frames later.
        """
        with self.lock:
            tid = self._next_id(self.tasks, id, "task")
            if project_id is not None and project_id not in self.projects:
                raise StateError(f"no project {project_id}")
            org_id = self._org_id(org)
            if project_id is not None and org is None:
                org_id = self.projects[project_id].org_id
            now = self.now()
            decoded = _decode_frames(frames or [])
            task = Task(id=tid, name=name, owner_id=self._owner(owner).id, org_id=org_id, project_id=project_id,
                        labels=[], frames=[], segment_size=int(segment_size or 0), overlap=overlap,
                        image_quality=image_quality, data_id=None, created=now, updated=now,
                        chunks_updated=None, assignee_id=self.user_by_name(assignee).id if assignee else None)
            if project_id is None:
                task.labels = self._make_labels(labels or [], tid, None)
            self.tasks[tid] = task
            if decoded:
                self._attach(task, decoded, image_quality, job_ids, data_id, chunks_at=now)
            if project_id is not None:
                self.projects[project_id].updated = self.now()
            return tid

    def attach_data(self, task_id: int, frames: list[tuple[str, bytes]], *, image_quality: int = 70,
                    job_ids: list[int] | None = None, data_id: int | None = None) -> None:
        """Give a task created without frames its frames and jobs, as a finished ``POST /api/tasks/{id}/data``
        does: jobs of the task's ``segment_size`` frames (0, or more than there are: one job), ``overlap``
        capped at half a segment (0 when not set), both then stored as used (CVAT writes them back)."""
        with self.lock:
            task = self.task(task_id)
            if task.has_data:
                raise StateError(f"task {task_id} already has data")
            decoded = _decode_frames(frames)
            if not decoded:
                raise StateError("no frames to attach")
            self._attach(task, decoded, image_quality, job_ids, data_id)

    def _attach(self, task: Task, decoded: list[Frame], image_quality: int, job_ids: list[int] | None,
                data_id: int | None, chunks_at: datetime | None = None) -> None:
        size = len(decoded)
        seg, overlap, segments = _segments(size, task.segment_size, task.overlap)
        if job_ids is not None and len(job_ids) != len(segments):
            raise StateError(f"task {task.name!r} gets {len(segments)} jobs, but {len(job_ids)} job ids were given")
        data_pk = self._data_ids + 1 if data_id is None else int(data_id)
        self._data_ids = max(self._data_ids, data_pk)
        task.frames = decoded
        task.segment_size, task.overlap = seg, overlap
        task.image_quality, task.data_id = int(image_quality), data_pk
        task.chunks_updated = chunks_at or self.now()
        for index, (start, stop) in enumerate(segments):
            jid = self._next_id(self.jobs, job_ids[index] if job_ids else None, "job")
            jnow = self.now()
            self.jobs[jid] = Job(id=jid, task_id=task.id, start_frame=start, stop_frame=stop, created=jnow,
                                 updated=jnow)
            task.jobs.append(jid)
        task.updated = self.now()

    def task(self, task_id: int) -> Task:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise StateError(f"no task {task_id}") from None

    def job(self, job_id: int) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise StateError(f"no job {job_id}") from None

    def touch(self, task: Task) -> None:
        """Bump the task's ``updated_date`` (every change to its data or annotations does)."""
        task.updated = self.now()

    def set_task_name(self, task_id: int, name: str) -> None:
        with self.lock:
            task = self.task(task_id)
            task.name = name
            self.touch(task)

    def set_task_assignee(self, task_id: int, username: str | None) -> None:
        with self.lock:
            task = self.task(task_id)
            task.assignee_id = self.user_by_name(username).id if username else None
            self.touch(task)

    def delete_frames(self, task_id: int, frames: list[int]) -> None:
        """Mark frames deleted (``data/meta`` ``deleted_frames``); exports leave them out."""
        with self.lock:
            task = self.task(task_id)
            for f in frames:
                if not 0 <= int(f) < len(task.frames):
                    raise StateError(f"task {task_id} has no frame {f}")
            task.deleted_frames = sorted(set(task.deleted_frames) | {int(f) for f in frames})
            self.touch(task)

    def set_frame_data(self, task_id: int, frame: int, data: bytes) -> None:
        """Hostile knob: serve ``data`` as frame ``frame`` (``original`` frames, chunks and exports) *without*
        checking that it is an image (a text file saved as ``ok.jpg``). The frame keeps its name and the size
        ``data/meta`` reports. Like a re-upload, this bumps the task's ``updated_date``."""
        with self.lock:
            task = self.task(task_id)
            if not 0 <= int(frame) < len(task.frames):
                raise StateError(f"task {task_id} has no frame {frame}")
            task.frames[int(frame)].data = bytes(data)
            task.frames[int(frame)].compressed = None
            self.touch(task)

    def remove_task(self, task_id: int) -> None:
        with self.lock:
            task = self.tasks.pop(task_id)
            for jid in task.jobs:
                self.jobs.pop(jid, None)

    # --- jobs ---------------------------------------------------------------------------------------

    def set_job_state(self, job_id: int, state: str | None = None, stage: str | None = None,
                      assignee: str | None = None) -> None:
        """Set a job's ``state``/``stage`` like ``PATCH /api/jobs/{id}`` does: a ``stage`` without a ``state``
        resets the state to ``new``; the legacy ``status`` is derived. Bumps the job's ``updated_date``; the
        task's moves only when the task's derived ``status`` changes (as in CVAT and the captures)."""
        with self.lock:
            job = self.job(job_id)
            if state is not None and state not in JOB_STATES:
                raise StateError(f"job state must be one of {JOB_STATES}, got {state!r}")
            if stage is not None and stage not in JOB_STAGES:
                raise StateError(f"job stage must be one of {JOB_STAGES}, got {stage!r}")
            if stage is not None:
                job.stage = stage
                job.state = state or "new"
            elif state is not None:
                job.state = state
            if assignee is not None:
                job.assignee_id = self.user_by_name(assignee).id if assignee else None
            job.updated = self.now()
            task = self.tasks[job.task_id]
            status = self.task_status(task)
            if status != task.status:
                task.status = status
                self.touch(task)  # CVAT saves the task (and so moves updated_date) when its status changes

    def task_status(self, task: Task) -> str:
        """The task ``status`` CVAT derives from its jobs' legacy statuses."""
        statuses = [legacy_status(self.jobs[j].stage, self.jobs[j].state) for j in task.jobs if j in self.jobs]
        if not statuses or "annotation" in statuses:
            return "annotation"
        return "validation" if "validation" in statuses else "completed"

    # --- annotations --------------------------------------------------------------------------------

    def _normalize_shape(self, task: Task, raw: dict[str, Any], ids: set[int]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise StateError(f"a shape must be an object, got {raw!r}")
        missing = [k for k in ("type", "frame", "label_id") if k not in raw]
        if missing:
            raise StateError(f"shape {raw!r} lacks {missing}")
        if raw["type"] not in SHAPE_TYPES:
            raise StateError(f"shape type {raw['type']!r} is not one of {SHAPE_TYPES}")
        frame = int(raw["frame"])
        if not 0 <= frame < len(task.frames):
            raise StateError(f"shape frame {frame} is outside task {task.id} (0..{len(task.frames) - 1})")
        label_ids = {lbl.id for lbl in self.task_labels(task)}
        if int(raw["label_id"]) not in label_ids:
            raise StateError(f"label_id {raw['label_id']} is not a label of task {task.id} "
                             f"({sorted(label_ids)})")
        points = raw.get("points", [])
        if raw["type"] == "mask":
            _check_mask_points(points, task.frames[frame], frame)
        if raw.get("id") is not None:
            sid = int(raw["id"])
            if sid in ids:
                raise StateError(f"shape id {sid} is used twice")
        else:
            sid = max(self._shape_ids, max(ids, default=0)) + 1
        ids.add(sid)
        self._shape_ids = max(self._shape_ids, sid)
        return {
            "type": raw["type"], "occluded": bool(raw.get("occluded", False)),
            "outside": bool(raw.get("outside", False)), "z_order": int(raw.get("z_order", 0)),
            "rotation": float(raw.get("rotation", 0.0)), "points": list(points), "id": sid, "frame": frame,
            "label_id": int(raw["label_id"]), "group": int(raw.get("group") or 0),
            "source": str(raw.get("source", "manual")), "attributes": list(raw.get("attributes", [])),
            "elements": list(raw.get("elements", [])),
        }

    def _all_shape_ids(self) -> set[int]:
        return {s["id"] for t in self.tasks.values() for s in t.shapes}

    def set_annotations(self, task_id: int, shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace all of a task's shapes (CVAT API form: ``type``, ``frame``, ``label_id``, ``points``, optional
        ``id``, ``occluded``, ``z_order``, ``rotation``, ``group``, ``source``, ``attributes``). Masks are
        ``points`` = CVAT RLE + ``[left, top, right, bottom]``. Returns the stored shapes (with ids)."""
        with self.lock:
            task = self.task(task_id)
            ids = self._all_shape_ids() - {s["id"] for s in task.shapes}
            stored = [self._normalize_shape(task, s, ids) for s in shapes]
            task.shapes = stored
            self.touch(task)
            return [dict(s) for s in stored]

    def add_shapes(self, task_id: int, shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append shapes (like ``PATCH …/annotations?action=create``); returns only the new ones."""
        with self.lock:
            task = self.task(task_id)
            ids = self._all_shape_ids()
            new = [self._normalize_shape(task, s, ids) for s in shapes]
            task.shapes.extend(new)
            self.touch(task)
            return [dict(s) for s in new]

    def update_shapes(self, task_id: int, shapes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Replace shapes by ``id`` (``action=update``)."""
        with self.lock:
            task = self.task(task_id)
            by_id = {s["id"]: i for i, s in enumerate(task.shapes)}
            out = []
            for raw in shapes:
                if raw.get("id") not in by_id:
                    raise StateError(f"task {task_id} has no shape {raw.get('id')}")
                ids = self._all_shape_ids() - {raw["id"]}
                new = self._normalize_shape(task, raw, ids)
                task.shapes[by_id[raw["id"]]] = new
                out.append(dict(new))
            self.touch(task)
            return out

    def delete_shapes(self, task_id: int, shape_ids: list[int] | None = None,
                      frames: range | None = None) -> None:
        with self.lock:
            task = self.task(task_id)
            task.shapes = [s for s in task.shapes
                           if not ((shape_ids is None or s["id"] in shape_ids)
                                   and (frames is None or s["frame"] in frames))]
            self.touch(task)

    # --- permissions --------------------------------------------------------------------------------

    def can_see_task(self, user: User, task: Task) -> bool:
        if user.admin or task.owner_id == user.id or task.assignee_id == user.id:
            return True
        if task.org_id is not None and user.id in self.orgs[task.org_id].members:
            return True
        return any(self.jobs[j].assignee_id == user.id for j in task.jobs if j in self.jobs)

    def can_see_project(self, user: User, project: Project) -> bool:
        if user.admin or project.owner_id == user.id or project.assignee_id == user.id:
            return True
        return project.org_id is not None and user.id in self.orgs[project.org_id].members

    def in_scope(self, user: User, org_id: int | None, has_org_context: bool, obj_org: int | None) -> bool:
        """List filter: with an org context only that org's objects; without one, admins see everything and
        other users their personal (org-less) workspace."""
        if has_org_context:
            return obj_org == org_id
        return user.admin or obj_org is None


# --- helpers ----------------------------------------------------------------------------------------------

_PALETTE = ("#33ddff", "#fa3253", "#34d1b7", "#ff007c", "#ff6037", "#ddff33", "#b83df5", "#ffcc33",
            "#24b353", "#034257", "#c080c0", "#83e070")


def _color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _decode_frames(frames: list[tuple[str, bytes]]) -> list[Frame]:
    decoded = [_frame(name, data) for name, data in frames]
    names = [f.name for f in decoded]
    if len(set(names)) != len(names):
        raise StateError(f"frame names must be unique in a task, got duplicates in {names}")
    return decoded


def _segments(size: int, segment_size: int, overlap: int | None) -> tuple[int, int, list[tuple[int, int]]]:
    """CVAT 2.23's ``_get_task_segment_data`` for an image task: ``(segment_size, overlap, [(start, stop)])``."""
    seg = int(segment_size or 0)
    if seg <= 0 or seg > size:
        seg, step = size, size + 1  # one segment (CVAT: step = sys.maxsize)
    else:
        step = seg
    used = min(int(overlap), seg // 2) if overlap is not None else 0
    step -= used
    return seg, used, [(start, min(start + seg - 1, size - 1)) for start in range(0, size - used, step)]


def _frame(name: str, data: bytes) -> Frame:
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:
        raise StateError(f"frame {name!r} is not a readable image: {exc}") from exc
    return Frame(name=str(name), data=bytes(data), width=width, height=height)


def _check_mask_points(points: list[float], frame: Frame, index: int) -> None:
    if len(points) < 5:
        raise StateError(f"mask on frame {index}: points must be RLE + [left, top, right, bottom]")
    left, top, right, bottom = (round(float(v)) for v in points[-4:])
    if right < left or bottom < top:
        raise StateError(f"mask on frame {index}: bad box {points[-4:]}")
    total = sum(round(float(v)) for v in points[:-4])
    if total != (right - left + 1) * (bottom - top + 1):
        raise StateError(f"mask on frame {index}: RLE covers {total} pixels, the box "
                         f"{(right - left + 1)}x{(bottom - top + 1)}")
