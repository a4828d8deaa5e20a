"""The CVAT stand-in's task creation over HTTP (POST /api/tasks, POST /api/tasks/{id}/data, the create:task-<id>
request, DELETE /api/tasks/{id}), checked against the real 2.23.1 captures 06, 07, 08, 09, 16, 19 and 20."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from PIL import Image

from tests.cvat_standin import ROUTE_KINDS, StandinCVAT
from tests.standin_fixtures import CAPTURES, VIEWER, capture_frames, compare_json, load_capture, small_jpeg

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"captures not found at {CAPTURES}")

CVAT_JSON = "application/vnd.cvat+json"
RQ_KEYS = ["status", "message", "id", "operation", "progress", "created_date", "started_date", "finished_date",
           "expiry_date", "owner", "result_url", "result_id"]


@pytest.fixture
def cvat() -> Iterator[StandinCVAT]:
    with StandinCVAT() as server:
        server.add_user(*VIEWER)
        yield server


def session(cvat: StandinCVAT, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Token {token or cvat.admin_token}"
    return s


def when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def upload(s: requests.Session, cvat: StandinCVAT, tid: int, files: list[tuple[str, bytes]],
           quality: int = 70, sorting: str | None = "lexicographical") -> requests.Response:
    """Fixture 07's request: ``image_quality``, ``sorting_method``, then ``client_files[i]`` parts."""
    fields = {"image_quality": str(quality)}
    if sorting is not None:
        fields["sorting_method"] = sorting
    parts = [(f"client_files[{i}]", (name, data, "image/jpeg")) for i, (name, data) in enumerate(files)]
    return s.post(f"{cvat.url}/api/tasks/{tid}/data", data=fields, files=parts)


def poll(s: requests.Session, cvat: StandinCVAT, rq_id: str) -> dict[str, Any]:
    resp = s.get(f"{cvat.url}/api/requests/{rq_id}")
    assert resp.status_code == 200 and resp.headers["content-type"] == CVAT_JSON, resp.text
    return resp.json()


def wait(s: requests.Session, cvat: StandinCVAT, rq_id: str, limit: int = 10) -> dict[str, Any]:
    for _ in range(limit):
        status = poll(s, cvat, rq_id)
        if status["status"] in ("finished", "failed"):
            return status
    raise AssertionError(f"{rq_id} never ended")


def make_task(s: requests.Session, cvat: StandinCVAT, name: str = "t", **body: Any) -> dict[str, Any]:
    body.setdefault("labels", [{"name": "wbc", "type": "polygon", "attributes": []}])
    resp = s.post(f"{cvat.url}/api/tasks", json={"name": name, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


def frames(n: int, prefix: str = "f") -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i}.jpg", small_jpeg(i)) for i in range(n)]


# --- the captures ------------------------------------------------------------------------------------------

def test_create_upload_and_polls_match_captures_06_to_09(cvat: StandinCVAT) -> None:
    cvat.add_task("smoke", frames=frames(1), labels=["cell"], id=17)  # the new task becomes 18, as captured
    s = session(cvat)
    cap06 = load_capture("06")
    resp = s.post(f"{cvat.url}/api/tasks", json=cap06["request"]["body"])
    assert resp.status_code == 201 and resp.headers["content-type"] == CVAT_JSON
    assert resp.headers["location"] == f"{cvat.url}/api/tasks/18"
    assert compare_json(cap06["response"]["body"], resp.json(), cvat.url) == []
    labels = s.get(f"{cvat.url}/api/labels", params={"task_id": 18}).json()["results"]
    sent = cap06["request"]["body"]["labels"]
    assert [(lab["name"], lab["color"], lab["type"]) for lab in labels] == [
        (lab["name"], lab["color"], lab["type"]) for lab in sent]
    assert all(lab["task_id"] == 18 and "project_id" not in lab for lab in labels)

    cap07 = load_capture("07")
    parts = cap07["request"]["body_multipart"]["parts"]
    by_name = dict(capture_frames())
    fields = {p["name"]: p["value"] for p in parts if "value" in p}
    files = [(p["name"], (p["filename"], by_name[p["filename"]], p["content_type"])) for p in parts if "filename" in p]
    assert [f[0] for f in files] == [f"client_files[{i}]" for i in range(6)]
    files.reverse()  # sent in reverse: lexicographical sorting puts them back in order
    resp = s.post(f"{cvat.url}/api/tasks/18/data", data=fields, files=files)
    assert resp.status_code == cap07["response"]["status"] == 202
    assert resp.headers["content-type"] == CVAT_JSON and "content-encoding" not in resp.headers
    assert resp.json() == cap07["response"]["body"] == {"rq_id": "create:task-18"}
    assert s.get(f"{cvat.url}/api/tasks/18").json()["mode"] == ""  # not created until the request finishes

    for number, status in (("08", "started"), ("09", "finished")):
        cap = load_capture(number)
        got = poll(s, cvat, "create:task-18")
        assert got["status"] == status
        assert compare_json(cap["response"]["body"], got, cvat.url) == []
    assert when(got["expiry_date"]) - when(got["finished_date"]) == timedelta(seconds=500)
    assert when(got["created_date"]) <= when(got["started_date"]) <= when(got["finished_date"])

    task = s.get(f"{cvat.url}/api/tasks/18").json()
    cap19 = load_capture("19")["response"]["body"]
    assert list(task) == list(cap19)
    for key in ("mode", "overlap", "segment_size", "data_chunk_size", "data_compressed_chunk_type",
                "data_original_chunk_type", "size", "image_quality", "status", "dimension"):
        assert task[key] == cap19[key], key
    assert task["jobs"]["count"] == 2 and task["jobs"]["completed"] == 0
    meta = s.get(f"{cvat.url}/api/tasks/18/data/meta").json()
    assert compare_json(load_capture("20")["response"]["body"]["frames"], meta["frames"], cvat.url) == []
    jobs = s.get(f"{cvat.url}/api/jobs", params={"task_id": 18}).json()["results"]
    assert [(j["start_frame"], j["stop_frame"], j["state"], j["stage"]) for j in jobs] == [
        (3, 5, "new", "annotation"), (0, 2, "new", "annotation")]
    original = s.get(f"{cvat.url}/api/tasks/18/data", params={"type": "frame", "number": 0, "quality": "original"})
    assert original.content == by_name["IMG_2783.jpg"]


def test_create_in_project_matches_capture_16(cvat: StandinCVAT) -> None:
    cvat.add_project("capture-rvpbs-project", labels=[{"name": "basophil", "type": "polygon"},
                                                      {"name": "neutrophil", "type": "mask"}], id=6)
    cvat.add_task("capture-rvpbs", frames=frames(1), labels=["x"], id=18)
    s = session(cvat)
    cap = load_capture("16")
    resp = s.post(f"{cvat.url}/api/tasks", json=cap["request"]["body"])
    assert resp.status_code == 201 and resp.headers["location"] == f"{cvat.url}/api/tasks/19"
    assert compare_json(cap["response"]["body"], resp.json(), cvat.url) == []
    labels = s.get(f"{cvat.url}/api/labels", params={"task_id": 19}).json()["results"]
    assert [(lab["name"], lab.get("project_id"), "task_id" in lab) for lab in labels] == [
        ("basophil", 6, False), ("neutrophil", 6, False)]
    rq_id = upload(s, cvat, 19, frames(2, "in_project_")).json()["rq_id"]
    done = wait(s, cvat, rq_id)
    assert done["status"] == "finished" and done["operation"]["project_id"] == 6
    task = s.get(f"{cvat.url}/api/tasks/19").json()
    assert (task["size"], task["segment_size"], task["overlap"], task["jobs"]["count"]) == (2, 2, 0, 1)
    listed = s.get(f"{cvat.url}/api/tasks", params={"project_id": 6}).json()["results"]
    assert [t["id"] for t in listed] == [19]


# --- uploads -----------------------------------------------------------------------------------------------

def test_sorting_and_segment_size_split_jobs(cvat: StandinCVAT) -> None:
    s = session(cvat)
    names = ["img10.jpg", "img2.jpg", "b.jpg", "img1.jpg", "a.jpg", "c.jpg", "img3.jpg"]
    files = [(n, small_jpeg(i, 40 + i, 30)) for i, n in enumerate(names)]
    expected = {
        "predefined": names,
        "lexicographical": sorted(names),
        "natural": ["a.jpg", "b.jpg", "c.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "img10.jpg"],
    }
    for method, order in expected.items():
        tid = make_task(s, cvat, method, segment_size=3)["id"]
        assert wait(s, cvat, upload(s, cvat, tid, files, quality=55, sorting=method).json()["rq_id"])["status"] \
            == "finished"
        meta = s.get(f"{cvat.url}/api/tasks/{tid}/data/meta").json()
        assert [f["name"] for f in meta["frames"]] == order, method
        sizes = {n: (40 + i, 30) for i, n in enumerate(names)}
        assert [(f["width"], f["height"]) for f in meta["frames"]] == [sizes[n] for n in order]
        assert meta["image_quality"] == 55 and meta["size"] == 7
        jobs = s.get(f"{cvat.url}/api/jobs", params={"task_id": tid}).json()["results"]
        assert sorted((j["start_frame"], j["stop_frame"]) for j in jobs) == [(0, 2), (3, 5), (6, 6)]
    random_tid = make_task(s, cvat, "random")["id"]
    wait(s, cvat, upload(s, cvat, random_tid, files, sorting="random").json()["rq_id"])
    shuffled = [f.name for f in cvat.task(random_tid).frames]
    assert sorted(shuffled) == sorted(names) and len(cvat.task(random_tid).jobs) == 1
    default_tid = make_task(s, cvat, "no sorting_method")["id"]  # the serializer's default: lexicographical
    wait(s, cvat, upload(s, cvat, default_tid, files, sorting=None).json()["rq_id"])
    assert [f.name for f in cvat.task(default_tid).frames] == sorted(names)


def test_overlap_and_segment_larger_than_task(cvat: StandinCVAT) -> None:
    s = session(cvat)
    big = make_task(s, cvat, "big segment", segment_size=50)["id"]
    wait(s, cvat, upload(s, cvat, big, frames(4)).json()["rq_id"])
    assert (cvat.task(big).segment_size, len(cvat.task(big).jobs)) == (4, 1)
    lapped = make_task(s, cvat, "overlap", segment_size=4, overlap=1)["id"]
    assert s.get(f"{cvat.url}/api/tasks/{lapped}").json()["overlap"] == 1
    wait(s, cvat, upload(s, cvat, lapped, frames(7)).json()["rq_id"])
    spans = sorted((cvat.jobs[j].start_frame, cvat.jobs[j].stop_frame) for j in cvat.task(lapped).jobs)
    assert spans == [(0, 3), (3, 6)]


def test_upload_names_keep_only_the_file_name(cvat: StandinCVAT) -> None:
    s = session(cvat)
    tid = make_task(s, cvat)["id"]
    files = [("dir/sub/x.jpg", small_jpeg(1)), ("C:\\slides\\y.jpg", small_jpeg(2))]
    wait(s, cvat, upload(s, cvat, tid, files, sorting="predefined").json()["rq_id"])
    assert [f.name for f in cvat.task(tid).frames] == ["x.jpg", "y.jpg"]


def test_request_polling_follows_export_polls() -> None:
    for polls, seen in ((0, ["finished"]), (2, ["queued", "started", "finished"])):
        with StandinCVAT(export_polls=polls) as cvat:
            s = session(cvat)
            tid = make_task(s, cvat)["id"]
            rq_id = upload(s, cvat, tid, frames(2)).json()["rq_id"]
            statuses = [poll(s, cvat, rq_id) for _ in range(len(seen))]
            assert [st["status"] for st in statuses] == seen
            assert [st["message"] for st in statuses] == [
                "Task is being saved in database" if st["status"] == "started" else "" for st in statuses]
            assert [list(st) for st in statuses] == [RQ_KEYS] * len(seen)
            queued = [st for st in statuses if st["status"] == "queued"]
            assert all(st["started_date"] is None and st["expiry_date"] is None for st in queued)
            assert cvat.task(tid).has_data
            listed = s.get(f"{cvat.url}/api/requests").json()["results"]
            assert [r["id"] for r in listed] == [rq_id]


def test_new_api_rq_id_form() -> None:
    with StandinCVAT(version="2.32.0") as cvat:
        s = session(cvat)
        tid = make_task(s, cvat)["id"]
        rq_id = upload(s, cvat, tid, frames(1)).json()["rq_id"]
        assert rq_id == f"action=create&target=task&target_id={tid}"
        assert wait(s, cvat, rq_id)["operation"]["type"] == "create:task"


# --- failures ----------------------------------------------------------------------------------------------

def test_undecodable_image_ends_the_request_failed(cvat: StandinCVAT) -> None:
    s = session(cvat)
    tid = make_task(s, cvat)["id"]
    resp = upload(s, cvat, tid, [("good.jpg", small_jpeg(1)), ("bad.jpg", b"this is not a JPEG at all")])
    assert resp.status_code == 202  # the files are checked by the creation job, not by the upload
    first = poll(s, cvat, resp.json()["rq_id"])
    assert first["status"] == "started"
    failed = poll(s, cvat, resp.json()["rq_id"])
    assert failed["status"] == "failed"
    assert failed["message"] == "PIL.UnidentifiedImageError: cannot identify image file 'bad.jpg'"
    assert failed["finished_date"] is not None and failed["expiry_date"] is not None and failed["result_url"] is None
    task = s.get(f"{cvat.url}/api/tasks/{tid}").json()
    assert task["mode"] == "" and "size" not in task and task["jobs"]["count"] == 0
    # CVAT leaves the task without data: a new upload is accepted and can succeed
    again = upload(s, cvat, tid, [("good.jpg", small_jpeg(1))])
    assert again.status_code == 202
    assert wait(s, cvat, again.json()["rq_id"])["status"] == "finished"
    assert s.get(f"{cvat.url}/api/tasks/{tid}").json()["size"] == 1


def test_no_media_and_unsupported_media(cvat: StandinCVAT) -> None:
    s = session(cvat)
    for files, message in (
        ([("notes.txt", b"hello"), ("data.csv", b"a,b")], "ValueError: No media data found"),
        ([], "ValueError: No media data found"),
        ([("clip.mp4", b"\x00\x00\x00\x18ftypmp42")], "NotImplementedError: the CVAT stand-in creates tasks from "
                                                      "images only, not from a video ('clip.mp4')"),
    ):
        tid = make_task(s, cvat)["id"]
        assert wait(s, cvat, upload(s, cvat, tid, files).json()["rq_id"])["message"] == message
    # a file that is not media is skipped next to images, as CVAT skips it
    tid = make_task(s, cvat)["id"]
    wait(s, cvat, upload(s, cvat, tid, [("a.jpg", small_jpeg(1)), ("readme.txt", b"x")]).json()["rq_id"])
    assert [f.name for f in cvat.task(tid).frames] == ["a.jpg"]


def test_export_fail_fault_fails_the_create_request(cvat: StandinCVAT) -> None:
    s = session(cvat)
    fault = cvat.add_fault("export_fail", "create", path_contains="/data", message="disk full on the worker")
    tid = make_task(s, cvat)["id"]
    done = wait(s, cvat, upload(s, cvat, tid, frames(2)).json()["rq_id"])
    assert (done["status"], done["message"]) == ("failed", "disk full on the worker")
    assert fault.fired == 1 and not cvat.task(tid).has_data


def test_create_validation_errors(cvat: StandinCVAT) -> None:
    cvat.add_project("p", labels=["a"], id=6)
    s = session(cvat)
    cases: list[tuple[Any, Any]] = [
        ({"name": "", "labels": [{"color": "#ff0000"}, {"name": "ok"}]},
         {"name": ["This field may not be blank."], "labels": [{"name": ["This field is required."]}, {}]}),
        ({"name": "   ", "labels": [{"name": "  "}]},
         {"name": ["This field may not be blank."], "labels": [{"name": ["This field may not be blank."]}]}),
        ({"labels": [{"name": "a"}]}, {"name": ["This field is required."]}),
        ({"name": "t"}, ["Label set or project_id must be present"]),
        ({"name": "t", "labels": []}, ["Label set or project_id must be present"]),
        ({"name": "t", "labels": [{"name": "a"}], "project_id": 6},
         ["Project must have only one of Label set or project_id"]),
        ({"name": "t", "labels": [{"name": "a"}, {"name": "a"}]}, ["All label names must be unique"]),
        ({"name": "t", "project_id": 999}, ["Could not find project with provided id: 999"]),
        ({"name": "t", "labels": [{"name": "a"}], "segment_size": -1},
         {"segment_size": ["Ensure this value is greater than or equal to 0."]}),
        ({"name": "t", "labels": [{"name": "a"}], "segment_size": "many"},
         {"segment_size": ["A valid integer is required."]}),
        ({"name": "t", "labels": {"name": "a"}},
         {"labels": {"non_field_errors": ['Expected a list of items but got type "dict".']}}),
        ({"name": "t", "labels": ["a"]},
         {"labels": [{"non_field_errors": ["Invalid data. Expected a dictionary, but got str."]}]}),
        ({"name": "x" * 257, "labels": [{"name": "a"}]},
         {"name": ["Ensure this field has no more than 256 characters."]}),
        ({"name": "t", "labels": [{"name": "a", "attributes": [{"name": "n"}]}]},
         {"labels": [{"attributes": [{"mutable": ["This field is required."],
                                      "input_type": ["This field is required."],
                                      "values": ["This field is required."]}]}]}),
        ({"name": "t", "labels": [{"name": "a", "attributes": [
            {"name": "n", "mutable": False, "input_type": "text", "values": []},
            {"name": "n", "mutable": False, "input_type": "text", "values": []}]}]},
         ["Duplicate attribute with name 'n' exists"]),
        (["not", "an", "object"], {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}),
    ]
    before = set(cvat.tasks)
    for body, expected in cases:
        resp = s.post(f"{cvat.url}/api/tasks", json=body)
        assert (resp.status_code, resp.json()) == (400, expected), body
        assert resp.headers["content-type"] == CVAT_JSON
    assert set(cvat.tasks) == before
    ok = make_task(s, cvat, "  padded  ", labels=[{"name": " a ", "type": "banana", "attributes": [
        {"name": "size", "mutable": "true", "input_type": "number", "default_value": "1", "values": ["1", "9", "1"]}]}])
    assert ok["name"] == "padded" and ok["segment_size"] == 0 and ok["overlap"] is None
    label = s.get(f"{cvat.url}/api/labels", params={"task_id": ok["id"]}).json()["results"][0]
    assert (label["name"], label["type"]) == ("a", "banana")  # label types are not validated (README quirk 8)
    assert [(a["name"], a["mutable"], a["input_type"], a["values"]) for a in label["attributes"]] == [
        ("size", True, "number", ["1", "9", "1"])]


def test_upload_validation_errors(cvat: StandinCVAT) -> None:
    s = session(cvat)
    tid = make_task(s, cvat)["id"]
    url = f"{cvat.url}/api/tasks/{tid}/data"
    one = [("client_files[0]", ("a.jpg", small_jpeg(1), "image/jpeg"))]
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"data": {"sorting_method": "natural"}, "files": one}, {"image_quality": ["This field is required."]}),
        ({"data": {"image_quality": "-1", "sorting_method": "x"}, "files": one},
         {"image_quality": ["Ensure this value is greater than or equal to 0."],
          "sorting_method": ['"x" is not a valid choice.']}),
        ({"data": {"image_quality": "101"}, "files": one},
         {"image_quality": ["Ensure this value is less than or equal to 100."]}),
        ({"data": {"image_quality": "high"}, "files": one}, {"image_quality": ["A valid integer is required."]}),
        ({"data": {"image_quality": "70", "sorting_method": "bogus"}, "files": one},
         {"sorting_method": ['"bogus" is not a valid choice.']}),
        ({"data": {"image_quality": "70", "client_files[0]": "a.jpg"}},
         {"client_files": [{"file": ["The submitted data was not a file. Check the encoding type on the form."]}]}),
        ({"json": {"sorting_method": "natural"}}, {"image_quality": ["This field is required."]}),
        ({"data": b"image_quality=70", "headers": {"Content-Type": "text/plain"}},
         {"detail": 'Unsupported media type "text/plain" in request.'}),
        ({"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}},
         {"detail": "Multipart form parse error - Invalid boundary in multipart: None"}),
        ({"data": {"image_quality": "70"}, "files": [("client_files[0]", ("a.jpg", small_jpeg(1))),
                                                      ("client_files[1]", ("a.jpg", small_jpeg(2)))]},
         ["The CVAT stand-in refuses uploaded files with the same name: ['a.jpg']"]),
    ]
    for kwargs, expected in cases:
        resp = s.post(url, **kwargs)
        status = 415 if "Unsupported media type" in str(expected) else 400
        assert (resp.status_code, resp.json()) == (status, expected), kwargs
    assert not cvat.requests
    rq_id = upload(s, cvat, tid, frames(1)).json()["rq_id"]
    for _ in range(2):  # while the request runs, and once the task has its data
        again = upload(s, cvat, tid, frames(1))
        assert (again.status_code, again.json()) == (400, "Adding more data is not supported")
        wait(s, cvat, rq_id)
    assert s.post(f"{cvat.url}/api/tasks/999/data", data={"image_quality": "70"}).json() == {
        "detail": "No Task matches the given query."}


# --- delete, permissions, organizations, the log -----------------------------------------------------------

def test_delete_task(cvat: StandinCVAT) -> None:
    s = session(cvat)
    tid = make_task(s, cvat, segment_size=1)["id"]
    wait(s, cvat, upload(s, cvat, tid, frames(2)).json()["rq_id"])
    jobs = list(cvat.task(tid).jobs)
    resp = s.delete(f"{cvat.url}/api/tasks/{tid}")
    assert (resp.status_code, resp.content, resp.headers.get("content-type")) == (204, b"", None)
    assert s.get(f"{cvat.url}/api/tasks/{tid}").status_code == 404
    assert all(s.get(f"{cvat.url}/api/jobs/{j}").status_code == 404 for j in jobs)
    again = s.delete(f"{cvat.url}/api/tasks/{tid}")
    assert (again.status_code, again.json()) == (404, {"detail": "No Task matches the given query."})
    half = make_task(s, cvat, "half-made")["id"]  # created, never given data (a client cleaning up)
    assert s.delete(f"{cvat.url}/api/tasks/{half}").status_code == 204 and half not in cvat.tasks


def test_permissions(cvat: StandinCVAT) -> None:
    admin = session(cvat)
    viewer = session(cvat, cvat.token_of(VIEWER[0]))
    assert requests.post(f"{cvat.url}/api/tasks", json={"name": "t", "labels": [{"name": "a"}]}).status_code == 401
    mine = make_task(viewer, cvat, "viewer's")
    assert mine["owner"]["username"] == VIEWER[0]
    rq_id = upload(viewer, cvat, mine["id"], frames(1)).json()["rq_id"]
    assert wait(viewer, cvat, rq_id)["owner"]["username"] == VIEWER[0]
    theirs = make_task(admin, cvat, "admin's")["id"]
    forbidden = {"detail": "You do not have permission to perform this action."}
    for resp in (upload(viewer, cvat, theirs, frames(1)), viewer.delete(f"{cvat.url}/api/tasks/{theirs}")):
        assert (resp.status_code, resp.json()) == (403, forbidden)
    admin_rq = upload(admin, cvat, theirs, frames(2)).json()["rq_id"]
    hidden = viewer.get(f"{cvat.url}/api/requests/{admin_rq}")
    assert (hidden.status_code, hidden.text) == (404, "There is no request with specified id")
    wait(admin, cvat, admin_rq)
    # a job assignee sees the task but may not delete it
    cvat.set_job_state(cvat.task(theirs).jobs[0], assignee=VIEWER[0])
    assert viewer.get(f"{cvat.url}/api/tasks/{theirs}").status_code == 200
    assert viewer.delete(f"{cvat.url}/api/tasks/{theirs}").status_code == 403
    pid = cvat.add_project("admin's project", labels=["a"])
    resp = viewer.post(f"{cvat.url}/api/tasks", json={"name": "in p", "project_id": pid})
    assert (resp.status_code, resp.json()) == (403, forbidden)
    assert admin.delete(f"{cvat.url}/api/tasks/{mine['id']}").status_code == 204  # admins may delete anything
    assert set(cvat.tasks) == {theirs}


def test_organization_context(cvat: StandinCVAT) -> None:
    cvat.add_org("lab", owner="admin", members=[VIEWER[0]])
    pid = cvat.add_project("lab project", labels=["wbc"], org="lab")
    s = session(cvat)
    resp = s.post(f"{cvat.url}/api/tasks", json={"name": "t", "project_id": pid})
    assert (resp.status_code, resp.json()) == (400, ["The task and its project should be in the same organization."])
    made = s.post(f"{cvat.url}/api/tasks", json={"name": "t", "project_id": pid}, headers={"X-Organization": "lab"})
    assert made.status_code == 201 and made.json()["organization"] == cvat.org_by_slug("lab").id  # type: ignore[union-attr]
    plain = s.post(f"{cvat.url}/api/tasks?org=lab", json={"name": "x", "labels": [{"name": "a"}]}).json()
    assert plain["organization"] == made.json()["organization"] and plain["project_id"] is None
    personal = make_task(s, cvat, "personal")
    assert personal["organization"] is None
    # an organization member who is not the project's staff may not create tasks in it
    viewer = session(cvat, cvat.token_of(VIEWER[0]))
    denied = viewer.post(f"{cvat.url}/api/tasks", json={"name": "v", "project_id": pid},
                         headers={"X-Organization": "lab"})
    assert denied.status_code == 403


def test_route_kinds_and_log(cvat: StandinCVAT) -> None:
    assert "create" in ROUTE_KINDS
    s = session(cvat)
    cvat.reset_log()
    tid = make_task(s, cvat)["id"]
    wait(s, cvat, upload(s, cvat, tid, frames(1)).json()["rq_id"])
    s.delete(f"{cvat.url}/api/tasks/{tid}")
    assert [(e.method, e.kind, e.status) for e in cvat.log] == [
        ("POST", "create", 201), ("POST", "create", 202), ("GET", "request", 200), ("GET", "request", 200),
        ("DELETE", "update", 204)]
    # a fault aimed at the upload only (path_contains) leaves the task creation alone
    cvat.add_fault("status", "create", path_contains="/data", status=503, times=1)
    tid = make_task(s, cvat)["id"]
    assert upload(s, cvat, tid, frames(1)).status_code == 503
    assert upload(s, cvat, tid, frames(1)).status_code == 202
    allowed = s.options(f"{cvat.url}/api/tasks").headers["allow"]
    assert allowed == "GET, POST, OPTIONS"


def test_uploaded_frames_are_served_as_sent(cvat: StandinCVAT) -> None:
    s = session(cvat)
    tid = make_task(s, cvat)["id"]
    buf = io.BytesIO()
    Image.new("RGB", (33, 21), (200, 10, 10)).save(buf, "PNG")
    files = [("x.png", buf.getvalue()), ("y.jpg", small_jpeg(3, 64, 48))]
    wait(s, cvat, upload(s, cvat, tid, files, sorting="predefined").json()["rq_id"])
    for number, (_, data) in enumerate(files):
        got = s.get(f"{cvat.url}/api/tasks/{tid}/data", params={"type": "frame", "number": number,
                                                                 "quality": "original"})
        assert got.content == data
    meta = s.get(f"{cvat.url}/api/tasks/{tid}/data/meta").json()
    assert [(f["name"], f["width"], f["height"]) for f in meta["frames"]] == [("x.png", 33, 21), ("y.jpg", 64, 48)]
