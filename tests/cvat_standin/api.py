"""The stand-in's REST routes: routing, auth, organization scope, content negotiation, JSON shapes, exports.

Everything here runs under the state lock; the HTTP plumbing (gzip, chunking, faults, the log) is in
:mod:`tests.cvat_standin.server`.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import logging
import math
import mimetypes
import os
import random
import re
import secrets
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode

import cv2
import numpy as np
from PIL import Image

from tests.cvat_standin import exports
from tests.cvat_standin.state import (
    CHUNK_SIZE,
    JOB_STAGES,
    JOB_STATES,
    CreateRequest,
    ExportRequest,
    Job,
    Label,
    Org,
    Project,
    StateError,
    Task,
    User,
    iso,
    legacy_status,
)

if TYPE_CHECKING:
    from tests.cvat_standin.server import StandinCVAT

log = logging.getLogger(__name__)

JSON_CT = "application/vnd.cvat+json"
HTML_CT = "text/html; charset=utf-8"
NEW_API = (2, 32, 0)  # from here on: PAT Bearer auth, no legacy GET export flow, new rq_id/result_url form

DESCRIPTION = ("CVAT is completely re-designed and re-implemented version of Video Annotation Tool from Irvine, "
               "California tool. It is free, online, interactive video and image annotation tool for computer "
               "vision. It is being used by our team to annotate million of objects with different properties. "
               "Many UI and UX decisions are based on feedbacks from professional data annotation team.")
MSG_FORBIDDEN = "You do not have permission to perform this action."
MSG_NO_CREDENTIALS = "Authentication credentials were not provided."
MSG_UNKNOWN_FORMAT = "Unknown format specified for the request"
MSG_UNKNOWN_EXPORT = ("Unknown export request id. Please request export first by sending a request without the "
                      "action=download parameter.")
MSG_NO_REQUEST = "There is no request with specified id"
MSG_MORE_DATA = "Adding more data is not supported"
MSG_REQUIRED = "This field is required."
MSG_NOT_FILE = "The submitted data was not a file. Check the encoding type on the form."
SORTING_METHODS = ("lexicographical", "natural", "predefined", "random")
ATTRIBUTE_TYPES = ("checkbox", "radio", "number", "text", "select")
CREATE_STARTED = "Task is being saved in database"  # the started message of fixture 08
CREATE_RESULT_TTL = timedelta(seconds=500)  # finished creates: expiry = finished + 500 s (fixture 09)
CREATE_FAILURE_TTL = timedelta(days=90)  # failed creates: not captured (CVAT's import failure TTL; a guess)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


@dataclass
class Resp:
    """One response: ``stream`` bodies go out chunked without Content-Length (like Django's file responses)."""

    status: int
    body: bytes = b""
    content_type: str | None = JSON_CT
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: bool = False


class HttpError(Exception):
    def __init__(self, resp: Resp) -> None:
        super().__init__(resp.status)
        self.resp = resp


def json_resp(status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Resp:
    return Resp(status, json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
                JSON_CT, headers or [])


def detail(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> HttpError:
    return HttpError(json_resp(status, {"detail": message}, headers))


def text_resp(status: int, text: str) -> Resp:
    return Resp(status, text.encode("utf-8"), HTML_CT)


def not_found_page(path: str) -> Resp:
    """Unknown URL: an HTML page like Django's debug 404 (much shorter)."""
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta http-equiv="content-type" content="text/html; '
            f'charset=utf-8">\n  <title>Page not found at {html.escape(path)}</title>\n  <meta name="robots" '
            f'content="NONE,NOARCHIVE">\n</head>\n<body>\n  <div id="summary">\n    <h1>Page not found '
            f'<span>(404)</span></h1>\n    <p>The current path, <code>{html.escape(path.lstrip("/"))}</code>, '
            f"didn't match any of these (CVAT stand-in).</p>\n  </div>\n</body>\n</html>\n")
    return text_resp(404, page)


@dataclass
class Ctx:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: Any
    body: bytes
    base: str
    user: User | None = None
    org: Org | None = None
    org_context: bool = False
    html: bool = False

    def q(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.query:
            if k == key:
                return v
        return default

    def json_body(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(json_resp(400, {"detail": "JSON parse error"})) from None


@dataclass
class Route:
    kind: str
    handler: Callable[[Ctx, re.Match[str]], Resp] | None
    match: re.Match[str] | None = None
    public: bool = False
    allowed: tuple[str, ...] = ()


def _bool(value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    return value.strip().lower() in ("true", "1", "yes", "on")


class Api:
    """Routes of CVAT 2.23.1 over a :class:`~tests.cvat_standin.server.StandinCVAT` state."""

    def __init__(self, cvat: StandinCVAT) -> None:
        self.cvat = cvat
        s = r"/?"  # sub-resource actions accept an optional trailing slash; list/detail routes do not
        self._routes: list[tuple[re.Pattern[str], dict[str, tuple[str, Callable[..., Resp]]], bool]] = [
            (re.compile(r"/api/server/about"), {"GET": ("server", self.about)}, True),
            (re.compile(r"/api/server/annotation/formats"), {"GET": ("server", self.formats)}, False),
            (re.compile(r"/api/auth/login"), {"POST": ("auth", self.login)}, True),
            (re.compile(r"/api/auth/register"), {"POST": ("auth", self.register)}, True),
            (re.compile(r"/api/auth/logout"), {"POST": ("auth", self.logout)}, True),
            (re.compile(r"/api/users/self"), {"GET": ("user", self.users_self)}, False),
            (re.compile(r"/api/tasks"), {"GET": ("list", self.tasks_list), "POST": ("create", self.task_create)},
             False),
            (re.compile(r"/api/tasks/(\d+)"), {"GET": ("detail", self.task_retrieve),
                                               "DELETE": ("update", self.task_delete)}, False),
            (re.compile(r"/api/tasks/(\d+)/data/meta" + s), {"GET": ("meta", self.task_meta)}, False),
            (re.compile(r"/api/tasks/(\d+)/data" + s), {"GET": ("frame", self.task_data),
                                                        "POST": ("create", self.task_upload_data)}, False),
            (re.compile(r"/api/tasks/(\d+)/annotations" + s),
             {"GET": ("annotations", self.task_annotations), "PUT": ("update", self.task_annotations_put),
              "PATCH": ("update", self.task_annotations_patch),
              "DELETE": ("update", self.task_annotations_delete)}, False),
            (re.compile(r"/api/tasks/(\d+)/dataset" + s), {"GET": ("export", self.task_dataset_legacy)}, False),
            (re.compile(r"/api/tasks/(\d+)/dataset/export" + s), {"POST": ("export", self.task_export)}, False),
            (re.compile(r"/api/tasks/(\d+)/dataset/download" + s),
             {"GET": ("download", self.task_dataset_download)}, False),
            (re.compile(r"/api/jobs"), {"GET": ("list", self.jobs_list)}, False),
            (re.compile(r"/api/jobs/(\d+)"), {"GET": ("detail", self.job_retrieve),
                                              "PATCH": ("update", self.job_patch)}, False),
            (re.compile(r"/api/jobs/(\d+)/annotations" + s),
             {"GET": ("annotations", self.job_annotations), "PUT": ("update", self.job_annotations_put),
              "PATCH": ("update", self.job_annotations_patch)}, False),
            (re.compile(r"/api/jobs/(\d+)/data/meta" + s), {"GET": ("meta", self.job_meta)}, False),
            (re.compile(r"/api/jobs/(\d+)/data" + s), {"GET": ("frame", self.job_data)}, False),
            (re.compile(r"/api/labels"), {"GET": ("list", self.labels_list)}, False),
            (re.compile(r"/api/labels/(\d+)"), {"GET": ("detail", self.label_retrieve)}, False),
            (re.compile(r"/api/projects"), {"GET": ("list", self.projects_list)}, False),
            (re.compile(r"/api/projects/(\d+)"), {"GET": ("detail", self.project_retrieve)}, False),
            (re.compile(r"/api/requests"), {"GET": ("list", self.requests_list)}, False),
            (re.compile(r"/api/requests/([^/]+)"), {"GET": ("request", self.request_retrieve)}, False),
        ]

    @property
    def new_api(self) -> bool:
        return version_tuple(self.cvat.version) >= NEW_API

    # --- routing ------------------------------------------------------------------------------------

    def resolve(self, method: str, path: str, query: list[tuple[str, str]]) -> Route:
        for pattern, methods, public in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            entry = methods.get("GET" if method == "HEAD" else method)
            if entry is None:
                return Route("unknown" if method != "OPTIONS" else "server", None, match, public,
                             tuple(methods))
            kind, handler = entry
            qd = dict(query)
            if handler in (self.task_dataset_legacy, self.task_annotations) and "format" in qd:
                kind = "download" if qd.get("action") == "download" else "export"
            return Route(kind, handler, match, public, tuple(methods))
        return Route("unknown", None)

    def handle(self, route: Route, ctx: Ctx) -> Resp:
        if route.match is None:
            return not_found_page(ctx.path)
        if ctx.method == "OPTIONS":
            return Resp(200, b"", None, [("allow", ", ".join([*route.allowed, "OPTIONS"]))])
        ctx.html = self.negotiate(ctx)
        with self.cvat.lock:
            self.authenticate(ctx)
            if ctx.user is None and not route.public:
                raise detail(401, MSG_NO_CREDENTIALS, [("www-authenticate", "Token")])
            if route.handler is None:
                raise detail(405, f'Method "{ctx.method}" not allowed.')
            if not route.public:
                self.organization(ctx)
            return route.handler(ctx, route.match)

    def negotiate(self, ctx: Ctx) -> bool:
        """True for the browsable (HTML) rendering; 406 when neither renderer fits (DRF's precedence)."""
        accept = ctx.headers.get("Accept") or "*/*"
        ranges = []
        for part in accept.split(","):
            pieces = [p.strip() for p in part.split(";")]
            media = pieces[0].lower()
            if not media:
                continue
            params = [p for p in pieces[1:] if p and not p.lower().startswith("q=")]
            if any(p.lower().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in pieces[1:]):
                continue
            level = 0 if media == "*/*" else 1 if media.endswith("/*") else 3 if params else 2
            ranges.append((level, media))
        for level in (3, 2, 1, 0):
            for lvl, media in ranges:
                if lvl != level:
                    continue
                if media in (JSON_CT, "application/*", "*/*"):
                    return False
                if media in ("text/html", "text/*"):
                    return True
        raise detail(406, "Could not satisfy the request Accept header.")

    def authenticate(self, ctx: Ctx) -> None:
        header = ctx.headers.get("Authorization")
        if not header:
            return
        scheme, _, cred = header.strip().partition(" ")
        scheme, cred = scheme.lower(), cred.strip()
        unauthorized = [("www-authenticate", "Token")]
        users = list(self.cvat.users.values())
        if scheme == "token":
            if not cred:
                raise detail(401, "Invalid token header. No credentials provided.", unauthorized)
            for user in users:
                if user.token == cred:
                    ctx.user = user
                    return
            raise detail(401, "Invalid token.", unauthorized)
        if scheme == "basic":
            try:
                name, _, password = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise detail(401, "Invalid basic header. Credentials not correctly base64 encoded.",
                             unauthorized) from None
            for user in users:
                if user.username == name and user.password == password:
                    ctx.user = user
                    return
            raise detail(401, "Invalid username/password.", unauthorized)
        if scheme == "bearer" and self.new_api:
            for user in users:
                if cred in user.access_tokens:
                    ctx.user = user
                    return
            raise detail(401, "Invalid token.", unauthorized)
        # any other scheme (and Bearer before 2.32) is ignored by every authentication class

    def organization(self, ctx: Ctx) -> None:
        """The organization context (``X-Organization``, ``?org=`` or ``?org_id=``), resolved only on routes that
        check permissions (CVAT evaluates it lazily, so ``/api/server/about`` ignores a bad one)."""
        header, slug, org_id = ctx.headers.get("X-Organization"), ctx.q("org"), ctx.q("org_id")
        if header is None and slug is None and org_id is None:
            return
        if org_id is not None and (slug is not None or header is not None):
            raise HttpError(json_resp(400, ['You cannot specify "org_id" query parameter with "org" query parameter '
                                            'or "X-Organization" HTTP header at the same time.']))
        if slug is not None and header is not None and slug != header:
            raise HttpError(json_resp(400, ['You cannot specify "org" query parameter and "X-Organization" HTTP '
                                            "header with different values."]))
        slug = slug if slug is not None else header
        ctx.org_context = True
        if not slug and not org_id:
            return  # an empty value: the personal workspace
        org = self.cvat.org_by_slug(slug) if slug else (
            self.cvat.orgs.get(int(org_id)) if org_id and org_id.isdigit() else None)
        if org is None:
            raise detail(404, f"{slug or org_id} organization does not exist.")
        if ctx.user is not None and not ctx.user.admin and ctx.user.id not in org.members:
            raise detail(403, MSG_FORBIDDEN)
        ctx.org = org

    # --- helpers ------------------------------------------------------------------------------------

    def render(self, ctx: Ctx, status: int, data: Any, headers: list[tuple[str, str]] | None = None) -> Resp:
        if not ctx.html:
            return json_resp(status, data, headers)
        pretty = html.escape(json.dumps(data, indent=4, ensure_ascii=False))
        page = (f"<!DOCTYPE html>\n<html><head><title>CVAT REST API</title></head><body>\n"
                f"<pre>HTTP {status}\n\n{pretty}</pre>\n</body></html>\n")
        return Resp(status, page.encode("utf-8"), HTML_CT, headers or [])

    def paginate(self, ctx: Ctx, items: list[Any], serialize: Callable[[Any], dict[str, Any]]) -> Resp:
        size_raw = ctx.q("page_size")
        page_size = int(size_raw) if size_raw and size_raw.isdigit() and int(size_raw) > 0 else 10
        page_raw = ctx.q("page", "1") or "1"
        pages = max(1, math.ceil(len(items) / page_size))
        if page_raw == "last":
            page_raw = str(pages)
        if not page_raw.isdigit() or not 1 <= int(page_raw) <= pages:
            raise detail(404, "Invalid page.")
        page = int(page_raw)
        results = [serialize(x) for x in items[(page - 1) * page_size:page * page_size]]
        query = parse_qs(urlencode(ctx.query), keep_blank_values=True)

        def link(number: int | None) -> str:
            q = dict(query)
            if number is None:
                q.pop("page", None)
            else:
                q["page"] = [str(number)]
            encoded = urlencode(sorted(q.items()), doseq=True)
            return f"{ctx.base}{ctx.path}" + (f"?{encoded}" if encoded else "")

        data = {"count": len(items), "next": link(page + 1) if page < pages else None,
                "previous": None if page == 1 else link(None if page == 2 else page - 1), "results": results}
        return self.render(ctx, 200, data)

    def _int_q(self, ctx: Ctx, key: str) -> int | None:
        raw = ctx.q(key)
        if raw is None or raw == "":
            return None
        if not raw.lstrip("-").isdigit():
            raise HttpError(json_resp(400, {key: ["Enter a whole number."]}))
        return int(raw)

    def get_task(self, ctx: Ctx, task_id: int) -> Task:
        task = self.cvat.tasks.get(task_id)
        if task is None or (ctx.org_context and task.org_id != (ctx.org.id if ctx.org else None)):
            raise detail(404, "No Task matches the given query.")
        if not self.cvat.can_see_task(ctx.user, task):  # type: ignore[arg-type]
            raise detail(403, MSG_FORBIDDEN)
        return task

    def get_job(self, ctx: Ctx, job_id: int) -> tuple[Job, Task]:
        job = self.cvat.jobs.get(job_id)
        task = self.cvat.tasks.get(job.task_id) if job else None
        if job is None or task is None or (ctx.org_context and task.org_id != (ctx.org.id if ctx.org else None)):
            raise detail(404, "No Job matches the given query.")
        if not self.cvat.can_see_task(ctx.user, task):  # type: ignore[arg-type]
            raise detail(403, MSG_FORBIDDEN)
        return job, task

    def visible_tasks(self, ctx: Ctx) -> list[Task]:
        user = ctx.user
        org_id = ctx.org.id if ctx.org else None
        out = [t for t in self.cvat.tasks.values()
               if self.cvat.in_scope(user, org_id, ctx.org_context, t.org_id)  # type: ignore[arg-type]
               and self.cvat.can_see_task(user, t)]  # type: ignore[arg-type]
        return sorted(out, key=lambda t: -t.id)

    def user_summary(self, ctx: Ctx, user_id: int | None) -> dict[str, Any] | None:
        user = self.cvat.users.get(user_id) if user_id is not None else None
        if user is None:
            return None
        return {"url": f"{ctx.base}/api/users/{user.id}", "id": user.id, "username": user.username,
                "first_name": user.first_name, "last_name": user.last_name}

    # --- JSON shapes --------------------------------------------------------------------------------

    def task_json(self, ctx: Ctx, task: Task) -> dict[str, Any]:
        b = ctx.base
        jobs = [self.cvat.jobs[j] for j in task.jobs]
        d: dict[str, Any] = {
            "url": f"{b}/api/tasks/{task.id}", "id": task.id, "name": task.name, "project_id": task.project_id,
            "mode": "annotation" if task.has_data else "", "owner": self.user_summary(ctx, task.owner_id),
            "assignee": self.user_summary(ctx, task.assignee_id), "bug_tracker": "",
            "created_date": iso(task.created), "updated_date": iso(task.updated), "overlap": task.overlap,
            "segment_size": task.segment_size, "status": task.status,
        }
        if task.has_data:
            d.update(data_chunk_size=CHUNK_SIZE, data_compressed_chunk_type="imageset")
        d["guide_id"] = None
        if task.has_data:
            d.update(data_original_chunk_type="imageset", size=len(task.frames), image_quality=task.image_quality,
                     data=task.data_id)
        d.update({
            "dimension": "2d", "subset": task.subset, "organization": task.org_id, "target_storage": None,
            "source_storage": None,
            # CVAT counts a job as completed only when it is also in the acceptance stage
            # (TaskQuerySet.with_job_summary: state=completed AND stage=acceptance)
            "jobs": {"count": len(jobs),
                     "completed": sum(j.state == "completed" and j.stage == "acceptance" for j in jobs),
                     "validation": sum(j.stage == "validation" for j in jobs),
                     "url": f"{b}/api/jobs?task_id={task.id}"},
            "labels": {"url": f"{b}/api/labels?task_id={task.id}"}, "assignee_updated_date": None,
            "validation_mode": None,
        })
        return d

    def job_json(self, ctx: Ctx, job: Job) -> dict[str, Any]:
        b = ctx.base
        task = self.cvat.tasks[job.task_id]
        return {
            "url": f"{b}/api/jobs/{job.id}", "id": job.id, "task_id": job.task_id, "project_id": task.project_id,
            "assignee": self.user_summary(ctx, job.assignee_id), "guide_id": None, "dimension": "2d",
            "bug_tracker": None, "status": legacy_status(job.stage, job.state), "stage": job.stage,
            "state": job.state, "mode": "annotation", "frame_count": job.stop_frame - job.start_frame + 1,
            "start_frame": job.start_frame, "stop_frame": job.stop_frame, "data_chunk_size": CHUNK_SIZE,
            "data_compressed_chunk_type": "imageset", "data_original_chunk_type": "imageset",
            "created_date": iso(job.created), "updated_date": iso(job.updated),
            "issues": {"url": f"{b}/api/issues?job_id={job.id}", "count": 0},
            "labels": {"url": f"{b}/api/labels?job_id={job.id}"}, "type": "annotation",
            "organization": task.org_id, "target_storage": None, "source_storage": None,
            "assignee_updated_date": None,
        }

    @staticmethod
    def label_json(label: Label) -> dict[str, Any]:
        d: dict[str, Any] = {"id": label.id, "name": label.name, "color": label.color,
                             "attributes": [dict(a) for a in label.attributes], "type": label.type,
                             "sublabels": []}
        if label.project_id is not None:
            d["project_id"] = label.project_id
        else:
            d["task_id"] = label.task_id
        d.update(parent_id=None, has_parent=False)
        return d

    def project_json(self, ctx: Ctx, project: Project) -> dict[str, Any]:
        b = ctx.base
        tasks = [t for t in self.cvat.tasks.values() if t.project_id == project.id]
        subsets = sorted({t.subset for t in tasks if t.subset})
        return {
            "url": f"{b}/api/projects/{project.id}", "id": project.id, "name": project.name,
            "owner": self.user_summary(ctx, project.owner_id),
            "assignee": self.user_summary(ctx, project.assignee_id), "guide_id": None, "bug_tracker": "",
            "created_date": iso(project.created), "updated_date": iso(project.updated), "status": "annotation",
            "dimension": "2d" if tasks else None, "organization": project.org_id, "target_storage": None,
            "source_storage": None, "tasks": {"count": len(tasks), "url": f"{b}/api/tasks?project_id={project.id}"},
            "labels": {"url": f"{b}/api/labels?project_id={project.id}"}, "assignee_updated_date": None,
            "task_subsets": subsets,
        }

    @staticmethod
    def shape_json(shape: dict[str, Any]) -> dict[str, Any]:
        """A stored shape as GET returns it (that key order; points as floats)."""
        return {"id": shape["id"], "label_id": shape["label_id"], "type": shape["type"], "frame": shape["frame"],
                "group": shape["group"], "source": shape["source"], "occluded": shape["occluded"],
                "outside": shape["outside"], "z_order": shape["z_order"], "rotation": float(shape["rotation"]),
                "points": [float(v) for v in shape["points"]],
                "attributes": [dict(a) for a in shape["attributes"]], "elements": list(shape["elements"])}

    def annotations_json(self, task: Task, frames: range | None = None) -> dict[str, Any]:
        shapes = sorted((s for s in task.shapes if frames is None or s["frame"] in frames),
                        key=lambda s: (s["frame"], s["id"]))
        return {"version": 0, "tags": [], "shapes": [self.shape_json(s) for s in shapes], "tracks": []}

    def request_json(self, ctx: Ctx, rq: ExportRequest) -> dict[str, Any]:
        if isinstance(rq, CreateRequest):
            return self.create_request_json(rq)
        owner = self.cvat.users.get(rq.user_id)
        status = self.request_status(rq)
        result_url = None
        if status == "finished":
            if self.new_api:
                result_url = f"{ctx.base}/api/tasks/{rq.task_id}/dataset/download?rq_id={quote(rq.rq_id, safe='')}"
            else:
                sub = "dataset" if rq.save_images else "annotations"
                query = urlencode([("format", rq.format), ("save_images", "true" if rq.save_images else "false"),
                                   ("action", "download")])
                result_url = f"{ctx.base}/api/tasks/{rq.task_id}/{sub}?{query}"
        return {
            "status": status, "message": (rq.fail_message or "") if status == "failed" else "", "id": rq.rq_id,
            "operation": {"type": f"export:{'dataset' if rq.save_images else 'annotations'}", "target": "task",
                          "project_id": None, "task_id": rq.task_id, "job_id": None, "format": rq.format,
                          "function_id": None},
            "progress": 0.0, "created_date": iso(rq.created), "started_date": iso(rq.started),
            "finished_date": iso(rq.finished),
            "expiry_date": iso(rq.finished + timedelta(hours=24)) if rq.finished else None,
            "owner": {"id": owner.id, "username": owner.username} if owner else None,
            "result_url": result_url, "result_id": None,
        }

    # --- export requests ----------------------------------------------------------------------------

    def request_status(self, rq: ExportRequest) -> str:
        if rq.done:
            return "failed" if rq.failed else "finished"
        return "started" if rq.polls >= max(self.cvat.export_polls, 1) else "queued"

    def poll(self, ctx: Ctx, rq: ExportRequest) -> None:
        """One status check: the ``export_polls``-th check still says started, the next one finishes."""
        if rq.done:
            return
        rq.polls += 1
        if rq.polls >= self.cvat.export_polls and rq.started is None:
            rq.started = self.cvat.now()
        if rq.polls > self.cvat.export_polls:
            self.finish(ctx, rq)

    def finish(self, ctx: Ctx, rq: ExportRequest) -> None:
        if isinstance(rq, CreateRequest):
            self.finish_create(rq)
            return
        now = self.cvat.now()
        rq.started = rq.started or now
        task = self.cvat.tasks.get(rq.task_id)
        if rq.fail_message is None and task is None:
            rq.fail_message = f"Task {rq.task_id} was deleted"
        if rq.fail_message is None and rq.format not in exports.BUILT_FORMATS:
            rq.fail_message = (f"NotImplementedError: the CVAT stand-in builds only {', '.join(exports.BUILT_FORMATS)} "
                               f"exports, not {rq.format!r}")
        if rq.fail_message is None and task is not None:
            try:
                rq.zip_bytes = exports.build_zip(self.cvat, task, rq.format, rq.save_images, ctx.base, now)
                rq.filename = exports.export_filename(task, rq.format, rq.save_images)
            except Exception as exc:
                log.exception("stand-in export %s failed", rq.rq_id)
                rq.fail_message = f"{type(exc).__name__}: {exc}"
        rq.failed = rq.fail_message is not None
        rq.finished = self.cvat.now()

    def create_request(self, ctx: Ctx, task: Task, fmt: str, save_images: bool) -> ExportRequest:
        rq_id = exports.rq_id_for(task.id, fmt, save_images, ctx.user.id, self.new_api)  # type: ignore[union-attr]
        rq = ExportRequest(rq_id=rq_id, task_id=task.id, format=fmt, save_images=save_images,
                           user_id=ctx.user.id, created=self.cvat.now())  # type: ignore[union-attr]
        fired = self.cvat.faults.pick("export", ctx.method, ctx.path, ("export_fail",))
        if fired:
            rq.fail_message = fired[0].message
        self.cvat.requests[rq_id] = rq
        if self.cvat.export_polls <= 0:
            self.finish(ctx, rq)
        return rq

    def download(self, rq: ExportRequest) -> Resp:
        """Serve the export zip (chunked, no Content-Length) and forget the request (one-shot)."""
        self.cvat.requests.pop(rq.rq_id, None)
        assert rq.zip_bytes is not None and rq.finished is not None
        headers = [("content-disposition", f'attachment; filename="{rq.filename}"'),
                   ("last-modified", format_datetime(rq.finished.replace(microsecond=0), usegmt=True))]
        return Resp(200, rq.zip_bytes, "application/zip", headers, stream=True)

    def _format(self, ctx: Ctx) -> str:
        fmt = ctx.q("format")
        if not fmt or fmt not in exports.EXPORTERS:
            raise HttpError(json_resp(400, [MSG_UNKNOWN_FORMAT]))
        return fmt

    # --- handlers: server, auth, users --------------------------------------------------------------

    def about(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self.render(ctx, 200, {"name": "Computer Vision Annotation Tool", "description": DESCRIPTION,
                                      "version": self.cvat.version})

    def formats(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self.render(ctx, 200, {"importers": [exports.format_entry(n, True) for n in exports.IMPORTERS],
                                      "exporters": [exports.format_entry(n, False) for n in exports.EXPORTERS]})

    def login(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        data = ctx.json_body()
        if not isinstance(data, dict):
            raise HttpError(json_resp(400, {"non_field_errors": ["Invalid data."]}))
        name, email, password = data.get("username"), data.get("email"), data.get("password")
        if not password:
            raise HttpError(json_resp(400, {"password": ["This field is required."]}))
        for user in self.cvat.users.values():
            if (user.username == name or (email and user.email == email)) and user.password == password:
                user.last_login = self.cvat.now()
                return self.render(ctx, 200, {"key": user.token}, self.session_cookies())
        raise HttpError(json_resp(400, {"non_field_errors": ["Unable to log in with provided credentials."]}))

    def logout(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self.render(ctx, 200, {"detail": "Successfully logged out."})

    def register(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        data = ctx.json_body()
        name = data.get("username") if isinstance(data, dict) else None
        if not name:
            raise HttpError(json_resp(400, {"username": ["This field is required."]}))
        if data.get("password1") != data.get("password2") or not data.get("password1"):
            raise HttpError(json_resp(400, {"non_field_errors": ["The two password fields didn't match."]}))
        if any(u.username == name for u in self.cvat.users.values()):
            raise HttpError(json_resp(400, {"username": ["A user with that username already exists."]}))
        token = self.cvat.add_user(name, data["password1"], admin=False, email=data.get("email", ""),
                                   first_name=data.get("first_name", ""), last_name=data.get("last_name", ""))
        return self.render(ctx, 201, {"username": name, "email": data.get("email", ""),
                                      "first_name": data.get("first_name", ""),
                                      "last_name": data.get("last_name", ""), "email_verification_required": False,
                                      "key": token},
                           [("set-cookie", f"messages={secrets.token_urlsafe(24)}; HttpOnly; Path=/; SameSite=Lax"),
                            *self.session_cookies()])

    def session_cookies(self) -> list[tuple[str, str]]:
        """The ``Set-Cookie`` headers of a login or registration (fixtures 01 and 56): ``csrftoken`` (a year),
        ``sessionfresh=1`` (a day) and ``sessionid`` (two weeks). cvat-sdk's ``Client.login`` asserts that
        ``sessionid`` and ``csrftoken`` arrive. The stand-in hands out fresh random values but authenticates
        only by the ``Authorization`` header, never by these cookies."""
        now = self.cvat.now().replace(microsecond=0)

        def cookie(name: str, value: str, max_age: int, http_only: bool) -> tuple[str, str]:
            expires = format_datetime(now + timedelta(seconds=max_age), usegmt=True)
            flags = "; HttpOnly" if http_only else ""
            return ("set-cookie", f"{name}={value}; expires={expires}{flags}; Max-Age={max_age}; Path=/; "
                                  "SameSite=Lax")

        return [cookie("csrftoken", secrets.token_hex(16), 31449600, False),
                cookie("sessionfresh", "1", 86400, True),
                cookie("sessionid", secrets.token_hex(16), 1209600, True)]

    def users_self(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        u = ctx.user
        assert u is not None
        return self.render(ctx, 200, {
            "url": f"{ctx.base}/api/users/{u.id}", "id": u.id, "username": u.username, "first_name": u.first_name,
            "last_name": u.last_name, "email": u.email, "groups": ["admin"] if u.admin else ["user"],
            "is_staff": u.admin, "is_superuser": u.admin, "is_active": True, "last_login": iso(u.last_login),
            "date_joined": iso(u.date_joined), "has_analytics_access": u.admin})

    # --- handlers: tasks ----------------------------------------------------------------------------

    def tasks_list(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        tasks = self.visible_tasks(ctx)
        project_id = self._int_q(ctx, "project_id")
        if project_id is not None:
            tasks = [t for t in tasks if t.project_id == project_id]
        name = ctx.q("name")
        if name:
            tasks = [t for t in tasks if name.lower() in t.name.lower()]
        return self.paginate(ctx, tasks, lambda t: self.task_json(ctx, t))

    def task_retrieve(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self.render(ctx, 200, self.task_json(ctx, self.get_task(ctx, int(m.group(1)))))

    def meta_json(self, task: Task, start: int, stop: int) -> dict[str, Any]:
        frames = [{"width": f.width, "height": f.height, "name": f.name, "related_files": 0,
                   "has_related_context": False} for f in task.frames[start:stop + 1]]
        return {"chunks_updated_date": iso(task.chunks_updated or task.created), "chunk_size": CHUNK_SIZE,
                "size": stop - start + 1 if task.frames else 0, "image_quality": task.image_quality,
                "start_frame": start, "stop_frame": stop, "frame_filter": "", "frames": frames,
                "deleted_frames": [f for f in task.deleted_frames if start <= f <= stop], "included_frames": None}

    def task_meta(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        task = self.get_task(ctx, int(m.group(1)))
        return self.render(ctx, 200, self.meta_json(task, 0, max(len(task.frames) - 1, 0)))

    def frame(self, ctx: Ctx, task: Task, first: int, last: int, chunks: bool = False) -> Resp:
        """``GET …/data``: ``type=frame`` (tasks and jobs) and ``type=chunk`` (tasks only, ``chunks=True``)."""
        kind = ctx.q("type")
        if kind not in ("frame", "chunk", "context_image"):
            raise HttpError(json_resp(400, {"type": [f'"{kind}" is not a valid choice.' if kind else
                                                     "This field is required."]}))
        if kind != "frame" and not (kind == "chunk" and chunks):
            raise HttpError(json_resp(400, [f"The CVAT stand-in serves only type=frame here, not type={kind}"]))
        quality = ctx.q("quality", "compressed")
        if quality not in ("original", "compressed"):
            raise HttpError(json_resp(400, {"quality": [f'"{quality}" is not a valid choice.']}))
        if kind == "chunk":
            return self.chunk(ctx, task, quality)
        number = self._int_q(ctx, "number")
        if number is None or not first <= number <= last:
            raise HttpError(json_resp(400, [f"The frame number should be in the [{first}, {last}] range"]))
        frame = task.frames[number]
        if quality == "original":
            return Resp(200, frame.data, _image_type(frame.data))
        if frame.compressed is None:
            frame.compressed = _recompress(frame.data, task.image_quality)
        return Resp(200, frame.compressed, "image/jpeg")

    def task_data(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        task = self.get_task(ctx, int(m.group(1)))
        if not task.frames:
            raise HttpError(json_resp(400, ["The task has no data"]))
        return self.frame(ctx, task, 0, len(task.frames) - 1, chunks=True)

    def chunk(self, ctx: Ctx, task: Task, quality: str) -> Resp:
        """``type=chunk&number=K`` of an image task, as CVAT 2.23's ``_TaskDataGetter`` answers it.

        A zip of the ``CHUNK_SIZE`` frames from ``K * CHUNK_SIZE`` on (deleted frames included), in frame order,
        stored uncompressed, named ``000000.<ext>``, ``000001.<ext>``, … by their index in the chunk:
        ``original`` holds each frame's bytes as uploaded (``ZipChunkWriter``; ``ext`` from the file name),
        ``compressed`` the frames re-encoded as JPEG at ``image_quality`` (``ZipCompressedChunkWriter``,
        ``.jpeg``). ``application/zip`` with ``X-Checksum`` (CRC32 of the first 1000 bytes seeded with the
        CRC32 of the length, as CVAT computes it) and ``X-Updated-Date`` (the chunks' update time). A bad
        chunk number is a 400 whose body is a bare JSON string (the view turns the ``ValidationError`` into
        ``Response(data=msg)``); no ``number`` is a 400 list, raised before that ``try``.
        """
        number_raw = ctx.q("number")
        if number_raw is None:
            raise HttpError(json_resp(400, ["Number is not specified"]))
        number = self._int_q(ctx, "number")
        last = math.ceil(len(task.frames) / CHUNK_SIZE) - 1
        if number is None or not 0 <= number <= last:
            raise HttpError(json_resp(400, f"Invalid chunk number '{number_raw}'. "
                                           f"The chunk number should be in the [0, {last}] range"))
        updated = task.chunks_updated or task.created
        stamp = updated.astimezone(timezone.utc).timetuple()[:6]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for index, frame in enumerate(task.frames[number * CHUNK_SIZE:(number + 1) * CHUNK_SIZE]):
                if quality == "original":
                    data, ext = frame.data, os.path.splitext(frame.name)[1].replace(".", "")
                else:
                    if frame.compressed is None:
                        frame.compressed = _recompress(frame.data, task.image_quality)
                    data, ext = frame.compressed, "jpeg"
                zf.writestr(zipfile.ZipInfo(f"{index:06d}.{ext}", date_time=stamp), data)
        body = buf.getvalue()
        checksum = zlib.crc32(body[:1000], zlib.crc32(str(len(body)).encode()))
        return Resp(200, body, "application/zip", [("x-checksum", str(checksum)), ("x-updated-date", iso(updated))])

    def task_annotations(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        if ctx.q("format") is not None:
            return self.legacy_export(ctx, int(m.group(1)), save_images=False)
        task = self.get_task(ctx, int(m.group(1)))
        return self.render(ctx, 200, self.annotations_json(task))

    def _shapes_in(self, ctx: Ctx) -> list[dict[str, Any]]:
        data = ctx.json_body()
        if not isinstance(data, dict):
            raise HttpError(json_resp(400, {"non_field_errors": ["Invalid data. Expected a dictionary."]}))
        if data.get("tracks") or data.get("tags"):
            raise HttpError(json_resp(400, ["The CVAT stand-in stores shapes only (no tags or tracks)"]))
        shapes = data.get("shapes", [])
        if not isinstance(shapes, list):
            raise HttpError(json_resp(400, {"shapes": ["Expected a list of items."]}))
        return shapes

    def _echo(self, ctx: Ctx, shapes_in: list[dict[str, Any]], stored: list[dict[str, Any]]) -> Resp:
        """PUT/PATCH responses echo the sent shapes (points as sent) with their new ids."""
        out = []
        for raw, shape in zip(shapes_in, stored, strict=True):
            echo = dict(shape)
            echo["points"] = list(raw.get("points", shape["points"]))
            out.append(echo)
        return self.render(ctx, 200, {"version": 0, "tags": [], "shapes": out, "tracks": []})

    def _write(self, ctx: Ctx, task: Task, frames: range | None, action: str | None) -> Resp:
        shapes = self._shapes_in(ctx)
        if frames is not None and any(int(s.get("frame", -1)) not in frames for s in shapes):
            raise HttpError(json_resp(400, ["A shape is outside the job's frame range"]))
        try:
            if action is None:
                keep = [s for s in task.shapes if frames is not None and s["frame"] not in frames]
                self.cvat.set_annotations(task.id, keep)
                stored = self.cvat.add_shapes(task.id, shapes)
            elif action == "create":
                stored = self.cvat.add_shapes(task.id, shapes)
            elif action == "update":
                stored = self.cvat.update_shapes(task.id, shapes)
            elif action == "delete":
                self.cvat.delete_shapes(task.id, [int(s["id"]) for s in shapes if "id" in s])
                stored = [dict(s) for s in shapes]
            else:
                raise HttpError(json_resp(400, [f"Please specify a correct 'action' for the request: {action}"]))
        except StateError as exc:
            raise HttpError(json_resp(400, [str(exc)])) from None
        return self._echo(ctx, shapes, stored)

    def task_annotations_put(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self._write(ctx, self.get_task(ctx, int(m.group(1))), None, None)

    def task_annotations_patch(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self._write(ctx, self.get_task(ctx, int(m.group(1))), None, ctx.q("action") or "")

    def task_annotations_delete(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        task = self.get_task(ctx, int(m.group(1)))
        self.cvat.delete_shapes(task.id)
        return Resp(204, b"", None)

    # --- handlers: task creation --------------------------------------------------------------------

    def create_rq_id(self, task_id: int) -> str:
        """``create:task-<id>`` (fixture 07); the >= 2.32 form is ``action=create&target=task&target_id=<id>``."""
        return f"action=create&target=task&target_id={task_id}" if self.new_api else f"create:task-{task_id}"

    def _org_admin(self, user: User, org_id: int | None) -> bool:
        org = self.cvat.orgs.get(org_id) if org_id is not None else None
        return org is not None and org.owner_id == user.id

    def _project_staff(self, user: User, project: Project) -> bool:
        """May create tasks in ``project``: an admin, the project's owner or assignee, its organization's owner
        (CVAT's maintainers and supervisors are not modelled: the stand-in has no organization roles)."""
        return (user.admin or user.id in (project.owner_id, project.assignee_id)
                or self._org_admin(user, project.org_id))

    def _task_staff(self, user: User, task: Task, *, assignee: bool = True) -> bool:
        """May upload a task's data (``assignee=True``) or delete it: an admin, the task's owner (or assignee,
        for uploads), the staff of its project, its organization's owner. Other users who can see the task
        (organization members, job assignees) get 403."""
        if user.admin or task.owner_id == user.id or (assignee and task.assignee_id == user.id):
            return True
        project = self.cvat.projects.get(task.project_id) if task.project_id is not None else None
        if project is not None and user.id in (project.owner_id, project.assignee_id):
            return True
        return self._org_admin(user, task.org_id)

    def task_create(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        """``POST /api/tasks`` (fixtures 06 and 16): a task without data, owned by the caller, in the caller's
        organization context; 201 with ``Location``. Errors as CVAT's ``TaskWriteSerializer`` gives them: field
        errors as a dict (``{"labels": [{"name": ["This field is required."]}]}``), the checks of its
        ``create()`` as a bare list (``["Label set or project_id must be present"]``)."""
        user = ctx.user
        assert user is not None
        data = ctx.json_body()
        if not isinstance(data, dict):
            raise HttpError(json_resp(400, {"non_field_errors": [
                f"Invalid data. Expected a dictionary, but got {type(data).__name__}."]}))
        # the permission check (CVAT's TaskPermission) runs before the serializer: create@project
        project: Project | None = None
        raw_project = data.get("project_id")
        if raw_project and _as_int(raw_project) is not None:
            pid = _as_int(raw_project)
            project = self.cvat.projects.get(pid)  # type: ignore[arg-type]
            if project is None:
                raise HttpError(json_resp(400, [f"Could not find project with provided id: {pid}"]))
            if not self._project_staff(user, project):
                raise detail(403, MSG_FORBIDDEN)
        errors: dict[str, Any] = {}
        name = _char_field(data, "name", errors, 256)
        project_id = _int_field(data, "project_id", errors, nullable=True)
        for key in ("owner_id", "assignee_id"):  # accepted, not applied (the caller owns the task)
            _int_field(data, key, errors, nullable=True)
        _char_field(data, "bug_tracker", errors, 2000, required=False, allow_blank=True)
        overlap = _int_field(data, "overlap", errors, minimum=0, maximum=2147483647, nullable=True)
        segment_size = _int_field(data, "segment_size", errors, minimum=0, maximum=2147483647)
        labels = _labels_field(data, errors)
        subset = _char_field(data, "subset", errors, 64, required=False, allow_blank=True)
        if errors:
            raise HttpError(json_resp(400, errors))
        if not (labels or project_id):
            raise HttpError(json_resp(400, ["Label set or project_id must be present"]))
        if labels and project_id:
            raise HttpError(json_resp(400, ["Project must have only one of Label set or project_id"]))
        org_id = ctx.org.id if ctx.org else None
        if project is not None and project.org_id != org_id:
            raise HttpError(json_resp(400, ["The task and its project should be in the same organization."]))
        seen: set[str] = set()
        for label in labels:  # LabelSerializer.create_labels, label by label
            attr_names = [a["name"] for a in label["attributes"]]
            dup = next((a for i, a in enumerate(attr_names) if a in attr_names[:i]), None)
            if dup is not None:
                raise HttpError(json_resp(400, [f"Duplicate attribute with name '{dup}' exists"]))
            if label["name"] in seen:
                raise HttpError(json_resp(400, ["All label names must be unique"]))
            seen.add(label["name"])
        tid = self.cvat.add_task(str(name), labels=labels, project_id=project.id if project else None,
                                 segment_size=segment_size, org=org_id, owner=user.username, overlap=overlap)
        task = self.cvat.tasks[tid]
        if subset:
            task.subset = subset
        return self.render(ctx, 201, self.task_json(ctx, task), [("location", f"{ctx.base}/api/tasks/{tid}")])

    def task_delete(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        """``DELETE /api/tasks/{id}``: 204 with an empty body; its jobs, frames and shapes go with it."""
        task = self.get_task(ctx, int(m.group(1)))
        if not self._task_staff(ctx.user, task, assignee=False):  # type: ignore[arg-type]
            raise detail(403, MSG_FORBIDDEN)
        self.cvat.remove_task(task.id)
        if task.project_id is not None and task.project_id in self.cvat.projects:
            self.cvat.projects[task.project_id].updated = self.cvat.now()
        return Resp(204, b"", None)

    def task_upload_data(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        """``POST /api/tasks/{id}/data`` (fixture 07): the plain one-request form (multipart ``client_files[i]``,
        ``image_quality``, ``sorting_method``; no TUS) -> 202 ``{"rq_id": "create:task-<id>"}``. The files are
        checked and become frames when the request is polled to completion (see :meth:`finish_create`)."""
        user = ctx.user
        assert user is not None
        task = self.get_task(ctx, int(m.group(1)))
        if not self._task_staff(user, task):
            raise detail(403, MSG_FORBIDDEN)
        rq_id = self.create_rq_id(task.id)
        pending = self.cvat.requests.get(rq_id)
        if task.has_data or (pending is not None and not pending.done):
            return self.render(ctx, 400, MSG_MORE_DATA)
        fields, files = self._data_form(ctx)
        errors: dict[str, Any] = {}
        quality = _int_field(fields, "image_quality", errors, minimum=0, maximum=100, required=True)
        file_errors = [{} if isinstance(f, tuple) else {"file": [MSG_NOT_FILE]} for f in files]
        if any(file_errors):
            errors["client_files"] = file_errors
        sorting = fields.get("sorting_method", "lexicographical")
        if sorting not in SORTING_METHODS:
            errors["sorting_method"] = [f'"{sorting}" is not a valid choice.']
        if errors:
            raise HttpError(json_resp(400, errors))
        for key in ("server_files", "remote_files"):
            if fields.get(key) or any(k.startswith(f"{key}[") and v for k, v in fields.items()):
                raise HttpError(json_resp(400, [f"The CVAT stand-in takes uploaded client_files only, not {key}"]))
        uploads = [f for f in files if isinstance(f, tuple)]
        names = [n for n, _ in uploads]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:  # CVAT would save them over each other in the upload folder
            raise HttpError(json_resp(400, [f"The CVAT stand-in refuses uploaded files with the same name: {dups}"]))
        rq = CreateRequest(rq_id=rq_id, task_id=task.id, format="", save_images=False, user_id=user.id,
                           created=self.cvat.now(), files=uploads, image_quality=int(quality or 0),
                           sorting_method=str(sorting), project_id=task.project_id)
        fired = self.cvat.faults.pick("create", ctx.method, ctx.path, ("export_fail",))
        if fired:
            rq.fail_message = fired[0].message
        self.cvat.requests[rq_id] = rq
        if self.cvat.export_polls <= 0:
            self.finish(ctx, rq)
        return self.render(ctx, 202, {"rq_id": rq_id})

    def _data_form(self, ctx: Ctx) -> tuple[dict[str, Any], list[tuple[str, bytes] | str]]:
        """The ``DataRequest`` fields and the ``client_files`` (by index, as DRF's ``parse_html_list`` orders
        them; a part without a file name is a string, which the serializer refuses)."""
        ctype = ctx.headers.get("Content-Type") or ""
        media = ctype.split(";")[0].strip().lower()
        fields: dict[str, Any] = {}
        indexed: dict[int, tuple[str, bytes] | str] = {}
        if media == "multipart/form-data":
            for part in parse_multipart(ctx.body, ctype):
                found = re.fullmatch(r"client_files\[(\d+)\]", part.name)
                if part.filename is not None:
                    name = _upload_name(part.filename)
                    if found and name is not None:  # Django drops a file whose name sanitizes to nothing
                        indexed[int(found.group(1))] = (name, part.data)
                else:
                    fields[part.name] = part.data.decode("utf-8", "replace")
        elif media == "application/x-www-form-urlencoded":
            fields = dict(parse_qsl(ctx.body.decode("utf-8", "replace"), keep_blank_values=True))
        elif media == "application/json" or (not ctx.body and not media):
            data = ctx.json_body()
            if not isinstance(data, dict):
                raise HttpError(json_resp(400, {"non_field_errors": [
                    f"Invalid data. Expected a dictionary, but got {type(data).__name__}."]}))
            fields = {k: v for k, v in data.items() if k != "client_files"}
            given = data.get("client_files") or []
            indexed = dict(enumerate(str(v) for v in (given if isinstance(given, list) else [given])))
        else:
            raise detail(415, f'Unsupported media type "{ctype}" in request.')
        for key in list(fields):  # form fields named like files: strings, which the serializer refuses
            found = re.fullmatch(r"client_files\[(\d+)\]", key)
            if found:
                indexed.setdefault(int(found.group(1)), str(fields.pop(key)))
        return fields, [indexed[i] for i in sorted(indexed)]

    def create_request_json(self, rq: CreateRequest) -> dict[str, Any]:
        """A task-creation request as ``GET /api/requests/{id}`` shows it (fixtures 08 and 09)."""
        owner = self.cvat.users.get(rq.user_id)
        status = self.request_status(rq)
        message = {"started": CREATE_STARTED, "failed": rq.fail_message or ""}.get(status, "")
        expiry = None
        if rq.finished is not None:
            expiry = rq.finished + (CREATE_FAILURE_TTL if rq.failed else CREATE_RESULT_TTL)
        return {
            "status": status, "message": message, "id": rq.rq_id,
            "operation": {"type": "create:task", "target": "task", "project_id": rq.project_id,
                          "task_id": rq.task_id, "job_id": None, "format": None, "function_id": None},
            "progress": 0.0, "created_date": iso(rq.created), "started_date": iso(rq.started),
            "finished_date": iso(rq.finished), "expiry_date": iso(expiry),
            "owner": {"id": owner.id, "username": owner.username} if owner else None,
            "result_url": None, "result_id": None,
        }

    def finish_create(self, rq: CreateRequest) -> None:
        """Run the task creation: keep the image files (others are skipped, as CVAT skips files whose type is
        not a media type), sort them, check each is an image, attach them with their jobs. Any failure ends the
        request ``failed`` with a message in the form CVAT's worker gives (``<ExceptionType>: <text>``); the
        task is then left without data, as CVAT leaves it."""
        rq.started = rq.started or self.cvat.now()
        task = self.cvat.tasks.get(rq.task_id)
        if rq.fail_message is None and task is None:
            rq.fail_message = "Task.DoesNotExist: Task matching query does not exist."
        if rq.fail_message is None and task is not None:
            try:
                frames = creation_frames(rq.files, rq.sorting_method, self.cvat.seed)
                self.cvat.attach_data(task.id, frames, image_quality=rq.image_quality)
            except CreateFailed as exc:
                rq.fail_message = str(exc)
            except StateError as exc:
                rq.fail_message = f"ValueError: {exc}"
        rq.files = []
        rq.failed = rq.fail_message is not None
        rq.finished = self.cvat.now()

    # --- handlers: exports --------------------------------------------------------------------------

    def task_export(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        task = self.get_task(ctx, int(m.group(1)))
        fmt = self._format(ctx)
        if ctx.q("location") == "cloud_storage":
            raise HttpError(json_resp(400, ["The CVAT stand-in has no cloud storage"]))
        save_images = _bool(ctx.q("save_images"))
        rq_id = exports.rq_id_for(task.id, fmt, save_images, ctx.user.id, self.new_api)  # type: ignore[union-attr]
        existing = self.cvat.requests.get(rq_id)
        if existing is not None:
            if not existing.done:
                return self.render(ctx, 409, "Export request is being processed")
            del self.cvat.requests[rq_id]
        rq = self.create_request(ctx, task, fmt, save_images)
        return self.render(ctx, 202, {"rq_id": rq.rq_id})

    def task_dataset_legacy(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        return self.legacy_export(ctx, int(m.group(1)), save_images=True)

    def legacy_export(self, ctx: Ctx, task_id: int, save_images: bool) -> Resp:
        """2.23.1's GET export flow: 202 while preparing, 201 when ready, 200 zip with ``action=download``."""
        if self.new_api:
            return not_found_page(ctx.path)
        task = self.get_task(ctx, task_id)
        fmt = self._format(ctx)
        rq_id = exports.rq_id_for(task.id, fmt, save_images, ctx.user.id)  # type: ignore[union-attr]
        rq = self.cvat.requests.get(rq_id)
        if rq is not None and rq.created < task.updated:
            del self.cvat.requests[rq_id]  # the task changed since: the cached export is stale
            rq = None
        download = ctx.q("action") == "download"
        if rq is None:
            if download:
                return text_resp(400, MSG_UNKNOWN_EXPORT)
            rq = self.create_request(ctx, task, fmt, save_images)
            self.poll(ctx, rq)
            if not rq.done:
                return self.render(ctx, 202, {"rq_id": rq.rq_id})
        else:
            self.poll(ctx, rq)
        if rq.done and rq.failed:
            del self.cvat.requests[rq.rq_id]
            return self.render(ctx, 500, rq.fail_message)
        if not rq.done:
            return self.render(ctx, 202, {"rq_id": rq.rq_id})
        if download:
            return self.download(rq)
        return Resp(201, b"", None)

    def task_dataset_download(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        """The >= 2.32 download endpoint that ``result_url`` points at (``?rq_id=``)."""
        if not self.new_api:
            return not_found_page(ctx.path)
        task = self.get_task(ctx, int(m.group(1)))
        rq = self.cvat.requests.get(ctx.q("rq_id") or "")
        if rq is None or isinstance(rq, CreateRequest) or rq.task_id != task.id \
                or rq.user_id != ctx.user.id:  # type: ignore[union-attr]
            return text_resp(400, MSG_UNKNOWN_EXPORT)
        if not rq.done or rq.failed:
            raise HttpError(json_resp(400, ["Export has not finished"]))
        return self.download(rq)

    def requests_list(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        mine = sorted((rq for rq in self.cvat.requests.values() if rq.user_id == ctx.user.id),  # type: ignore[union-attr]
                      key=lambda rq: rq.created, reverse=True)
        return self.paginate(ctx, mine, lambda rq: self.request_json(ctx, rq))

    def request_retrieve(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        rq = self.cvat.requests.get(unquote(m.group(1)))
        if rq is None or (rq.user_id != ctx.user.id and not ctx.user.admin):  # type: ignore[union-attr]
            return text_resp(404, MSG_NO_REQUEST)
        self.poll(ctx, rq)
        return self.render(ctx, 200, self.request_json(ctx, rq), [
            ("expires", format_datetime(self.cvat.now().replace(microsecond=0), usegmt=True)),
            ("cache-control", "max-age=0, no-cache, no-store, must-revalidate, private")])

    # --- handlers: jobs, labels, projects -----------------------------------------------------------

    def jobs_list(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        tasks = {t.id: t for t in self.visible_tasks(ctx)}
        jobs = [j for j in self.cvat.jobs.values() if j.task_id in tasks]
        task_id, project_id = self._int_q(ctx, "task_id"), self._int_q(ctx, "project_id")
        if task_id is not None:
            jobs = [j for j in jobs if j.task_id == task_id]
        if project_id is not None:
            jobs = [j for j in jobs if tasks[j.task_id].project_id == project_id]
        for key in ("state", "stage"):
            value = ctx.q(key)
            if value:
                choices = JOB_STATES if key == "state" else JOB_STAGES
                if value not in choices:
                    raise HttpError(json_resp(400, {key: [f"Select a valid choice. {value} is not one of the "
                                                          "available choices."]}))
                jobs = [j for j in jobs if getattr(j, key) == value]
        job_type = ctx.q("type")
        if job_type and job_type != "annotation":
            jobs = []
        jobs.sort(key=lambda j: -j.id)
        return self.paginate(ctx, jobs, lambda j: self.job_json(ctx, j))

    def job_retrieve(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, _ = self.get_job(ctx, int(m.group(1)))
        return self.render(ctx, 200, self.job_json(ctx, job))

    def job_patch(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, _task = self.get_job(ctx, int(m.group(1)))
        data = ctx.json_body()
        if not isinstance(data, dict):
            raise HttpError(json_resp(400, {"non_field_errors": ["Invalid data. Expected a dictionary."]}))
        state, stage = data.get("state"), data.get("stage")
        for key, value, choices in (("state", state, JOB_STATES), ("stage", stage, JOB_STAGES)):
            if value is not None and value not in choices:
                raise HttpError(json_resp(400, {key: [f'"{value}" is not a valid choice.']}))
        self.cvat.set_job_state(job.id, state=state, stage=stage)
        return self.render(ctx, 200, self.job_json(ctx, job))

    def job_annotations(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, task = self.get_job(ctx, int(m.group(1)))
        return self.render(ctx, 200, self.annotations_json(task, range(job.start_frame, job.stop_frame + 1)))

    def job_annotations_put(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, task = self.get_job(ctx, int(m.group(1)))
        return self._write(ctx, task, range(job.start_frame, job.stop_frame + 1), None)

    def job_annotations_patch(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, task = self.get_job(ctx, int(m.group(1)))
        return self._write(ctx, task, range(job.start_frame, job.stop_frame + 1), ctx.q("action") or "")

    def job_meta(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, task = self.get_job(ctx, int(m.group(1)))
        return self.render(ctx, 200, self.meta_json(task, job.start_frame, job.stop_frame))

    def job_data(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        job, task = self.get_job(ctx, int(m.group(1)))
        return self.frame(ctx, task, job.start_frame, job.stop_frame)

    def labels_list(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        task_id, project_id, job_id = (self._int_q(ctx, k) for k in ("task_id", "project_id", "job_id"))
        tasks = {t.id: t for t in self.visible_tasks(ctx)}
        if job_id is not None:
            job = self.cvat.jobs.get(job_id)
            task_id = job.task_id if job else -1
        labels: list[Label]
        if task_id is not None:
            task = tasks.get(task_id)
            labels = list(self.cvat.task_labels(task)) if task else []
        elif project_id is not None:
            project = self.cvat.projects.get(project_id)
            labels = list(project.labels) if project and self._project_visible(ctx, project) else []
        else:
            seen: dict[int, Label] = {}
            for task in tasks.values():
                seen.update({lbl.id: lbl for lbl in self.cvat.task_labels(task)})
            for project in self.cvat.projects.values():
                if self._project_visible(ctx, project):
                    seen.update({lbl.id: lbl for lbl in project.labels})
            labels = list(seen.values())
        labels.sort(key=lambda lbl: lbl.id)
        return self.paginate(ctx, labels, self.label_json)

    def label_retrieve(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        wanted = int(m.group(1))
        for task in self.visible_tasks(ctx):
            for lbl in self.cvat.task_labels(task):
                if lbl.id == wanted:
                    return self.render(ctx, 200, self.label_json(lbl))
        for project in self.cvat.projects.values():
            if self._project_visible(ctx, project):
                for lbl in project.labels:
                    if lbl.id == wanted:
                        return self.render(ctx, 200, self.label_json(lbl))
        raise detail(404, "No Label matches the given query.")

    def _project_visible(self, ctx: Ctx, project: Project) -> bool:
        org_id = ctx.org.id if ctx.org else None
        return (self.cvat.in_scope(ctx.user, org_id, ctx.org_context, project.org_id)  # type: ignore[arg-type]
                and self.cvat.can_see_project(ctx.user, project))  # type: ignore[arg-type]

    def projects_list(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        projects = sorted((p for p in self.cvat.projects.values() if self._project_visible(ctx, p)),
                          key=lambda p: -p.id)
        return self.paginate(ctx, projects, lambda p: self.project_json(ctx, p))

    def project_retrieve(self, ctx: Ctx, m: re.Match[str]) -> Resp:
        project = self.cvat.projects.get(int(m.group(1)))
        if project is None or (ctx.org_context and project.org_id != (ctx.org.id if ctx.org else None)):
            raise detail(404, "No Project matches the given query.")
        if not self.cvat.can_see_project(ctx.user, project):  # type: ignore[arg-type]
            raise detail(403, MSG_FORBIDDEN)
        return self.render(ctx, 200, self.project_json(ctx, project))


def _image_type(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data[:2] == b"BM":
        return "image/bmp"
    return "application/octet-stream"


def _recompress(data: bytes, quality: int) -> bytes:
    """The ``compressed`` frame: the original re-encoded as JPEG at the task's ``image_quality``."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        with Image.open(io.BytesIO(data)) as im:
            image = cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("could not re-encode a frame as JPEG")
    return buf.tobytes()


# --- task creation helpers (DRF field rules, multipart, the creation job) --------------------------------

_TRUE = {"t", "y", "yes", "true", "on", "1"}
_FALSE = {"f", "n", "no", "false", "off", "0"}


def _as_int(value: Any) -> int | None:
    """DRF ``IntegerField``'s parsing: ints, integral floats and numeric strings (``"3"``, ``"3.0"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return int(re.sub(r"\.0*\s*$", "", str(value)))
    except ValueError:
        return None


def _char_field(data: dict[str, Any], key: str, errors: dict[str, Any], max_length: int, *, required: bool = True,
                allow_blank: bool = False) -> str | None:
    """DRF ``CharField`` (whitespace trimmed); an error goes into ``errors[key]``."""
    if key not in data:
        if required:
            errors[key] = [MSG_REQUIRED]
        return None
    value = data[key]
    if value is None:
        errors[key] = ["This field may not be null."]
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        errors[key] = ["Not a valid string."]
        return None
    text = str(value).strip()
    if not text and not allow_blank:
        errors[key] = ["This field may not be blank."]
        return None
    if len(text) > max_length:
        errors[key] = [f"Ensure this field has no more than {max_length} characters."]
        return None
    return text


def _int_field(data: dict[str, Any], key: str, errors: dict[str, Any], *, minimum: int | None = None,
               maximum: int | None = None, nullable: bool = False, required: bool = False) -> int | None:
    """DRF ``IntegerField``; an error goes into ``errors[key]``."""
    if key not in data:
        if required:
            errors[key] = [MSG_REQUIRED]
        return None
    if data[key] is None:
        if not nullable:
            errors[key] = ["This field may not be null."]
        return None
    number = _as_int(data[key])
    if number is None:
        errors[key] = ["A valid integer is required."]
    elif minimum is not None and number < minimum:
        errors[key] = [f"Ensure this value is greater than or equal to {minimum}."]
    elif maximum is not None and number > maximum:
        errors[key] = [f"Ensure this value is less than or equal to {maximum}."]
    else:
        return number
    return None


def _labels_field(data: dict[str, Any], errors: dict[str, Any]) -> list[dict[str, Any]]:
    """``labels`` of a ``TaskWriteRequest`` (``LabelSerializer(many=True)``, attributes by
    ``AttributeSerializer``): label specs for the state builder, or the errors in DRF's nested shape. The
    label ``type`` is any string, as in CVAT (README quirk 8); ``id``, ``deleted``, ``sublabels`` and ``svg``
    are ignored (no skeletons)."""
    if "labels" not in data:
        return []
    raw = data["labels"]
    if raw is None:
        errors["labels"] = ["This field may not be null."]
        return []
    if not isinstance(raw, list):
        errors["labels"] = {"non_field_errors": [f'Expected a list of items but got type "{type(raw).__name__}".']}
        return []
    specs: list[dict[str, Any]] = []
    per_label: list[dict[str, Any]] = []
    for item in raw:
        err: dict[str, Any] = {}
        per_label.append(err)
        if not isinstance(item, dict):
            err["non_field_errors"] = [f"Invalid data. Expected a dictionary, but got {type(item).__name__}."]
            continue
        name = _char_field(item, "name", err, 64)
        color = _char_field(item, "color", err, 8, required=False, allow_blank=True)
        attrs = _attributes_field(item, err)
        kind = _char_field(item, "type", err, 32, required=False, allow_blank=True)
        spec: dict[str, Any] = {"name": name, "color": color or None, "attributes": attrs}
        if kind is not None:
            spec["type"] = kind
        specs.append(spec)
    if any(per_label):
        errors["labels"] = per_label
    return specs


def _attributes_field(label: dict[str, Any], errors: dict[str, Any]) -> list[dict[str, Any]]:
    raw = label.get("attributes", [])
    if not isinstance(raw, list):
        errors["attributes"] = {"non_field_errors": [
            f'Expected a list of items but got type "{type(raw).__name__}".']}
        return []
    out: list[dict[str, Any]] = []
    per_attr: list[dict[str, Any]] = []
    for item in raw:
        err: dict[str, Any] = {}
        per_attr.append(err)
        if not isinstance(item, dict):
            err["non_field_errors"] = [f"Invalid data. Expected a dictionary, but got {type(item).__name__}."]
            continue
        name = _char_field(item, "name", err, 64)
        mutable = item.get("mutable")
        if "mutable" not in item:
            err["mutable"] = [MSG_REQUIRED]
        elif str(mutable).lower() not in _TRUE | _FALSE:
            err["mutable"] = ["Must be a valid boolean."]
        if "input_type" not in item:
            err["input_type"] = [MSG_REQUIRED]
        elif item["input_type"] not in ATTRIBUTE_TYPES:
            err["input_type"] = [f'"{item["input_type"]}" is not a valid choice.']
        default = _char_field(item, "default_value", err, 128, required=False, allow_blank=True)
        values = item.get("values")
        if "values" not in item:
            err["values"] = [MSG_REQUIRED]
        elif not isinstance(values, list):
            err["values"] = [f'Expected a list of items but got type "{type(values).__name__}".']
        out.append({"name": name, "mutable": str(mutable).lower() in _TRUE, "input_type": item.get("input_type"),
                    "default_value": default or "", "values": [str(v).strip() for v in values or []]})
    if any(per_attr):
        errors["attributes"] = per_attr
    return out


@dataclass
class FormPart:
    name: str
    filename: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """A header's value and parameters as Django's ``parse_header_parameters`` reads them: ``;`` outside quotes
    separates, a quoted value loses its quotes and only ``\\\\`` and ``\\"`` are unescaped (so a Windows path
    keeps its backslashes), ``name*=utf-8''...`` is percent-decoded."""
    pieces, current, quoted, escaped = [], "", False, False
    for char in value:
        if char == ";" and not quoted:
            pieces.append(current)
            current = ""
            continue
        current += char
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
    pieces.append(current)
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        key, sep, raw = piece.partition("=")
        if not sep:
            continue
        key, raw = key.strip().lower(), raw.strip()
        encoded = key.endswith("*") and raw.count("'") == 2
        key = key.rstrip("*")
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        if encoded:
            charset, _lang, raw = raw.split("'")
            raw = unquote(raw, encoding=charset or "utf-8", errors="replace")
        params[key] = raw
    return pieces[0].strip().lower(), params


def parse_multipart(body: bytes, content_type: str) -> list[FormPart]:
    """A ``multipart/form-data`` body split into its parts, contents kept byte for byte, header parameters read as
    Django reads them. A body that is not valid multipart is DRF's 400 ``{"detail": "Multipart form parse error -
    ..."}``."""
    boundary = header_params(content_type)[1].get("boundary")

    def refuse(reason: str) -> HttpError:
        return HttpError(json_resp(400, {"detail": f"Multipart form parse error - {reason}"}))

    if not boundary:
        raise refuse("Invalid boundary in multipart: None")
    delim = b"--" + boundary.encode("latin-1", "replace")
    start = body.find(delim)
    if start < 0 or (start > 0 and body[start - 2:start] != b"\r\n"):
        raise refuse("Invalid boundary in multipart: " + boundary)
    pos = start + len(delim)
    parts: list[FormPart] = []
    while body[pos:pos + 2] != b"--":
        if body[pos:pos + 2] != b"\r\n":
            raise refuse("Invalid multipart body")
        pos += 2
        end = body.find(b"\r\n" + delim, pos)
        if end < 0:
            raise refuse("Unexpected end of the multipart body")
        chunk = body[pos:end]
        if chunk.startswith(b"\r\n"):
            head, content = b"", chunk[2:]
        else:
            head, sep, content = chunk.partition(b"\r\n\r\n")
            if not sep:
                raise refuse("Invalid part headers")
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        kind, params = header_params(disposition)
        if kind == "form-data" and "name" in params:
            parts.append(FormPart(params["name"], params.get("filename"), content))
        pos = end + 2 + len(delim)
    return parts


def _upload_name(filename: str) -> str | None:
    """The name Django keeps for an uploaded file (``MultiPartParser.sanitize_file_name``): HTML entities
    decoded, the part after the last ``/`` or ``\\``, printable characters only; None (the part is dropped)
    for an empty name, ``.`` or ``..``."""
    name = html.unescape(filename).rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    name = "".join(c for c in name if c.isprintable())
    return None if name in ("", ".", "..") else name


class CreateFailed(Exception):
    """The task-creation job failed; ``str()`` is the request's ``message``."""


def _media_kind(name: str) -> str | None:
    """The media type CVAT's ``get_mime`` gives a file (by its extension); None: not media, skipped."""
    mime, _encoding = mimetypes.guess_type(name)
    if mime is None:
        return None
    if mime.startswith("image") and not mime.startswith("image/svg"):
        return "image"
    if mime.startswith("video"):
        return "video"
    if mime == "application/pdf":
        return "pdf"
    if mime in ("application/zip", "application/x-tar", "application/gzip", "application/x-7z-compressed",
                "application/x-rar-compressed", "application/vnd.rar", "application/x-zip-compressed"):
        return "archive"
    return None


def _natural_key(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def creation_frames(files: list[tuple[str, bytes]], sorting_method: str, seed: int = 0) -> list[tuple[str, bytes]]:
    """The frames a ``POST /data`` upload becomes: images only (other non-media files skipped, as CVAT does),
    ordered by ``sorting_method`` (``predefined``: as uploaded; ``natural``: digit runs compared as numbers;
    ``random``: shuffled with the server seed), each checked to be an image. :class:`CreateFailed` with
    CVAT's messages (no media, an unreadable image) and the stand-in's (videos, PDFs and archives)."""
    images: list[tuple[str, bytes]] = []
    for name, data in files:
        kind = _media_kind(name)
        if kind == "image":
            images.append((name, data))
        elif kind is not None:
            raise CreateFailed(f"NotImplementedError: the CVAT stand-in creates tasks from images only, not from "
                               f"a {kind} ({name!r})")
    if not images:
        raise CreateFailed("ValueError: No media data found")
    if sorting_method == "random":
        random.Random(seed).shuffle(images)
    elif sorting_method == "natural":
        images.sort(key=lambda f: _natural_key(f[0]))
    elif sorting_method != "predefined":
        images.sort(key=lambda f: f[0])
    for name, data in images:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.size  # noqa: B018
        except Exception:
            raise CreateFailed(f"PIL.UnidentifiedImageError: cannot identify image file '{name}'") from None
    return images
