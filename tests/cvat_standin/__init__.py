"""A faithful CVAT 2.23.1 stand-in server for tests and benchmarks (real HTTP on 127.0.0.1).

Checked against the real captures in ``shared/reference/cvat-2.23.1-captures`` (field names and order, value
formats, status codes, the four error body shapes, pagination links, trailing-slash rules, gzip, the export
flows). Usage::

    from tests.cvat_standin import StandinCVAT, task_from_cvat_xml

    with StandinCVAT() as cvat:                      # port 0: any free port; admin/admin is user 1
        tid = cvat.add_task("t", frames=[("a.jpg", jpeg)], labels=[{"name": "wbc", "type": "polygon"}])
        cvat.set_annotations(tid, [{"type": "polygon", "frame": 0, "label_id": 1, "points": [...]}])
        requests.get(f"{cvat.url}/api/tasks/{tid}", headers={"Authorization": f"Token {cvat.admin_token}"})

Constructor: ``StandinCVAT(host="127.0.0.1", port=0, *, version="2.23.1", seed=0, export_polls=1,
admin=("admin", "admin"), admin_id=1)``. ``start()``/``stop()`` or a ``with`` block; ``url``;
``admin_token``. ``version >= "2.32.0"`` switches to the newer API: ``Authorization: Bearer <PAT>`` is
accepted, the legacy GET export flow is gone (404), export ids look like ``action=export&target=task&...`` and
``result_url`` is ``/api/tasks/{id}/dataset/download?rq_id=...``. ``export_polls`` = how many
``GET /api/requests/{id}`` polls still answer ``started`` (earlier ones ``queued``) before one finishes.

State builder (thread-safe; every change to a task's data or shapes bumps its ``updated_date``):

- ``add_user(username, password, admin=False, *, email=None, first_name="", last_name="", id=None) -> token``;
  ``add_access_token(username) -> PAT``; ``token_of(username)``.
- ``add_org(slug, name=None, owner=None, members=(), id=None) -> org id``.
- ``add_project(name, labels=None, org=None, id=None, owner=None) -> project id``.
- ``add_task(name, frames=[(name, image bytes)], labels=[{"name", "type", "color"?, "id"?, "attributes"?}],
  project_id=None, segment_size=None, org=None, id=None, owner=None, job_ids=None, image_quality=70,
  data_id=None, assignee=None, overlap=None) -> task id`` (one job per ``segment_size`` frames; a task in a
  project uses the project's labels); without frames, a task as ``POST /api/tasks`` leaves it, and
  ``attach_data(task_id, frames, *, image_quality=70, job_ids=None, data_id=None)`` gives it frames and jobs
  later. Ids are never handed out twice (a deleted task's id is not reused, as with CVAT's sequences).
- ``set_annotations(task_id, shapes)`` (replace; CVAT API shapes: ``type`` polygon/mask/rectangle/...,
  ``frame``, ``label_id``, ``points`` (mask: CVAT RLE + ``[left, top, right, bottom]``), optional ``id``,
  ``occluded``, ``z_order``, ``rotation``, ``group``, ``source``, ``attributes``); ``add_shapes``,
  ``update_shapes``, ``delete_shapes``.
- ``set_job_state(job_id, state=None, stage=None, assignee=None)`` (legacy ``status`` derived; a stage without
  a state resets the state to ``new``; as in real CVAT this moves the job's ``updated_date``, and the task's
  only when the task's derived ``status`` changes, e.g. all jobs acceptance+completed -> ``completed``).
- ``delete_frames(task_id, [frame, ...])``, ``set_task_name``, ``set_task_assignee``, ``remove_task``.
- Hostile: ``set_frame_data(task_id, frame, data)`` serves any bytes as a frame (no image check); frame names
  are taken as given (absolute paths, ``./x``, control characters, names that collide once normalised).
- ``task_from_cvat_xml(server, xml_path, frame_size=(1008, 756) or None, *, name=None, max_frames=None,
  segment_size=None, label_types=None, seed=0, **add_task_kwargs) -> task id``.

Task ``jobs.completed`` counts jobs with ``state=completed`` *and* ``stage=acceptance``, as CVAT's
``TaskQuerySet.with_job_summary`` does (so it can be lower than the jobs ``state=completed`` admits).

Permissions: admins see everything; other users see tasks/projects they own or are assigned to (task or job),
plus everything of organizations they belong to. ``X-Organization: <slug>`` (or ``?org=<slug>`` /
``?org_id=``) scopes lists and lookups to that organization (another org's task: 404; unknown slug: 404
``{"detail": "<slug> organization does not exist."}``, resolved lazily as in CVAT, so public routes such as
``/api/server/about`` ignore it; not a member: 403). Without it, admins see all and other users their org-less
workspace, but a lookup by id still finds an organization's task for its members. (Organizations were not
captured; this is a simplified model of CVAT's rules.)

Faults (seeded by ``seed``, switchable at run time): ``add_fault(kind, route="any", *, rate=1.0, times=None,
method=None, path_contains=None, status=503, retry_after=1, delay=0.5, fraction=0.5, message=...) -> Fault``,
``remove_fault(fault)``, ``clear_faults()``, ``faults.active()`` (the list; each ``Fault`` counts ``seen`` and
``fired``). Kinds ``status``, ``throttle``, ``delay``, ``reset``, ``drop``,
``truncate``, ``export_fail``, ``tamper`` (a hostile server: ``transform=`` rewrites the answer's JSON or bytes;
ready-made transforms in :mod:`tests.cvat_standin.hostile`: impossible job frame numbers, edited ``data/meta``,
zip bombs with honest or lying sizes); route kinds ``server``, ``auth``, ``user``, ``list``, ``detail``, ``meta``,
``frame``, ``annotations``, ``export``, ``request``, ``download``, ``update``, ``create`` (``POST
/api/tasks`` and its ``/data`` upload; ``path_contains="/data"`` picks the upload), ``unknown`` or ``any``
(details in :mod:`tests.cvat_standin.faults`). ``export_fail`` on route ``create`` makes the next task-creation
request end ``failed`` with ``message``.

Request log: ``cvat.log`` (list of :class:`LogEntry`: ``method, path, query, status, kind, bytes, fault, user,
seconds, gzip``; ``status`` 0 for a reset), ``log_where(kind=, status=, method=)``, ``bytes_sent(kind=None)``,
``reset_log()``.

Task creation over HTTP (checked against fixtures 06, 07, 08, 09, 16): ``POST /api/tasks`` (JSON
``TaskWriteRequest``: ``name``, ``labels`` or ``project_id``, ``segment_size``, ``overlap``, ``subset``) -> 201
with ``Location``, owned by the caller, in the caller's organization context; DRF's field errors as a dict
(``{"labels": [{"name": ["This field is required."]}]}``), the serializer's ``create()`` checks as a bare list
(``["Label set or project_id must be present"]``, ``["All label names must be unique"]``, the project/organization
checks). ``POST /api/tasks/{id}/data`` (multipart ``client_files[i]``, ``image_quality``, ``sorting_method``;
urlencoded and JSON bodies parsed too) -> 202 ``{"rq_id": "create:task-<id>"}``; a task with data (or a running
create request) -> 400 ``"Adding more data is not supported"``. ``GET /api/requests/create:task-<id>`` follows
``export_polls`` like an export (``started`` with "Task is being saved in database", then ``finished``,
``expiry_date`` = finished + 500 s); at that point the files become frames (sorted ``lexicographical``,
``natural``, ``predefined`` = upload order, or ``random``, seeded), jobs are cut by ``segment_size`` (and
``overlap``), and both are written back to the task. Files that are not media are skipped; no image at all, or a
file with an image name that does not decode, ends the request ``failed`` with CVAT's kind of message
(``ValueError: No media data found``, ``PIL.UnidentifiedImageError: cannot identify image file 'x.jpg'``) and
leaves the task without data (a new upload is allowed). ``DELETE /api/tasks/{id}`` -> 204. Creating in a project
takes an admin, its owner or assignee, or its organization's owner (else 403); uploading takes the task's owner,
assignee or project staff, deleting its owner or project staff (or an admin, or the organization's owner).

HTTP routes besides the reads and exports: ``POST /api/auth/register``, ``PUT``/``PATCH``
(``action=create|update|delete``)/``DELETE`` of task and job annotations, ``PATCH /api/jobs/{id}`` (state,
stage), job ``data``/``data/meta``, ``GET /api/requests`` and ``/api/labels/{id}``. Task chunks
(``GET /api/tasks/{id}/data?type=chunk&number=K&quality=original|compressed``: a zip of the chunk's frames,
``000000.<ext>`` …, with ``X-Checksum``/``X-Updated-Date``, as cvat-sdk's ``TaskDataset`` and
``auto_annotation.annotate_task`` read them; route kind ``frame``). Login and registration set the
``csrftoken``/``sessionfresh``/``sessionid`` cookies as CVAT does (cvat-sdk's ``Client.login`` requires them).

Not like real CVAT (known): no project creation over HTTP (builder API only); task creation takes only the
one-request upload of images (no TUS chunks, ``server_files``/``remote_files``/cloud storage, archives, videos or
PDFs, manifests, ``upload_file_order``, ``job_file_mapping``, frame filters or start/stop frames; ``owner_id``,
``assignee_id``, ``bug_tracker``, storages, label ``sublabels``/``svg`` are accepted and ignored), a new task keeps
its fresh form (``mode: ""``, no ``size``/``data``) until its create request finishes (CVAT attaches an empty data
object at once), the create request also finishes only when polled, the failure messages' exact texts, the
failed request's ``expiry_date`` (+90 days), the unknown-project 400 (modelled on CVAT's permission code) and
``natural`` sorting (digit runs as numbers; CVAT uses natsort) are not captured, an upload with two files of one
name is refused (CVAT would save one over the other), organization roles are not modelled (see the creation
permissions above), no tracks/tags, no job chunks (``/api/jobs/{id}/data?type=chunk``), chunks hold the frames'
bytes as given (CVAT re-encodes EXIF-rotated and TIFF frames upright in ``original`` chunks), the session cookies
are handed out but never authenticate (only the ``Authorization`` header does), no job or project exports, only
"COCO 1.0" and "CVAT for images 1.1" zips (other valid formats end ``failed``), no ``queued`` state unless
``export_polls`` >= 2 (a request finishes only when polled), no BREACH random padding in gzip (a few-hundred-byte
body is gzipped whenever that makes it shorter; Django's padding makes that a coin flip), the 404 debug page is
short, ``ext`` of formats other than the two captured is approximate, zip entries are in frame order, deleted
frames are left out of exports, and the >= 2.32 behaviour (PATs, new rq ids including
``action=create&target=task&target_id=<id>``, download endpoint) is from changelogs, not captures (real PATs
arrived later than 2.32).
"""

from tests.cvat_standin.faults import FAULT_KINDS, ROUTE_KINDS, Fault
from tests.cvat_standin.server import LogEntry, StandinCVAT
from tests.cvat_standin.state import StateError
from tests.cvat_standin.xmltask import (
    dataset_shapes,
    label_ids,
    synthetic_slide_jpeg,
    task_from_cvat_xml,
    task_from_dataset,
)

__all__ = ["FAULT_KINDS", "ROUTE_KINDS", "Fault", "LogEntry", "StandinCVAT", "StateError", "dataset_shapes",
           "label_ids", "synthetic_slide_jpeg", "task_from_cvat_xml", "task_from_dataset"]
