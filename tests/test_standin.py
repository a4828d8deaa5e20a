"""The CVAT 2.23.1 stand-in: replays of the real captures, exports, faults, auth, organizations, the log."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import requests
from PIL import Image
from pycocotools.coco import COCO

from tests.cvat_standin import StandinCVAT, StateError, task_from_cvat_xml
from tests.cvat_standin.exports import shape_to_instance
from tests.standin_fixtures import (
    CAPTURES,
    RVPBS,
    VIEWER,
    capture_frames,
    capture_shapes,
    compare_json,
    load_capture,
    setup_capture_session,
    small_jpeg,
)
from wbc_core.data.loader import load_dataset
from wbc_core.data.masks import cvat_rle_decode

pytestmark = pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"captures not found at {CAPTURES}")

CVAT_JSON = "application/vnd.cvat+json"
COCO_ZIP = CAPTURES / "task-export-coco-1.0-with-images.zip"
CVAT_ZIP = CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"


@pytest.fixture
def cvat() -> Iterator[StandinCVAT]:
    with StandinCVAT() as server:
        setup_capture_session(server)
        yield server


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def session(cvat: StandinCVAT, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Token {token or cvat.admin_token}"
    return s


# --- capture replay ----------------------------------------------------------------------------------------

# Not replayed, because the stand-in is set up through its builder API instead of over HTTP:
#   06/16 POST /api/tasks, 07 POST /api/tasks/18/data (multipart upload), 08/09 the create:task-18 request
#   polls, 15 POST /api/projects. The other writes (10-14 annotations and job PATCHes, 56 register) are
#   replayed in test_replay_write_captures, on a stand-in in the state just before them.
READ_REPLAY = ["01", "02", "03", "04", "05", "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27",
               "28", "29", "30", "31", "32", "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43",
               "44", "45", "46", "47", "48", "49", "50", "51", "52", "53", "54", "55", "57", "58", "59", "60",
               "61", "62", "63"]
ZIP_NAMES = {"36": COCO_ZIP, "41": CVAT_ZIP, "50": COCO_ZIP}


def replay(cvat: StandinCVAT, cap: dict[str, Any], tokens: dict[str, str]) -> requests.Response:
    """Send a captured request to the stand-in with the stand-in's own credentials."""
    req = cap["request"]
    headers = {k: v for k, v in req["headers"].items() if k in ("Accept", "Accept-Encoding", "Content-Type")}
    given = req["headers"].get("Authorization", "")
    if given.startswith("Token"):
        headers["Authorization"] = f"Token {tokens.get(cap['capture']['file'][:2], cvat.admin_token)}"
    elif given.startswith("Basic"):
        headers["Authorization"] = "Basic " + base64.b64encode(b"admin:admin").decode()
    body = req.get("body")
    if isinstance(body, dict) and "password" in body:
        body = {**body, "password": "admin"}
    if isinstance(body, dict) and "password1" in body:
        body = {**body, "password1": VIEWER[1], "password2": VIEWER[1]}
    data = json.dumps(body).encode() if body is not None else None
    return requests.request(req["method"], cvat.url + req["path"], headers=headers, data=data, timeout=30)


def check_exchange(cvat: StandinCVAT, number: str, cap: dict[str, Any], resp: requests.Response) -> list[str]:
    want = cap["response"]
    problems: list[str] = []
    if resp.status_code != want["status"]:
        return [f"{number}: status {resp.status_code} != captured {want['status']} ({resp.text[:200]})"]
    wh = want["headers"]
    if resp.headers.get("content-type") != wh.get("content-type"):
        problems.append(f"{number}: content-type {resp.headers.get('content-type')!r} != {wh.get('content-type')!r}")
    if resp.headers.get("www-authenticate") != wh.get("www-authenticate"):
        problems.append(f"{number}: www-authenticate {resp.headers.get('www-authenticate')!r}")
    # Django pads gzip bodies with up to 100 random bytes (BREACH mitigation) and sends the plain body when
    # that is not shorter, so whether a body of a few hundred bytes was compressed is down to chance there.
    coin_flip = want.get("decoded_size", 0) < 400
    if ("content-encoding" in wh) != ("content-encoding" in resp.headers) and not coin_flip:
        problems.append(f"{number}: gzip {resp.headers.get('content-encoding')!r} vs captured "
                        f"{wh.get('content-encoding')!r} ({len(resp.content)} bytes)")
    if wh.get("transfer-encoding") == "chunked" and (resp.headers.get("transfer-encoding") != "chunked"
                                                     or "content-length" in resp.headers):
        problems.append(f"{number}: a download must be chunked without Content-Length")
    if "body" in want:
        if want["body"] is None:
            if resp.content != b"" or resp.headers.get("content-length") != "0":
                problems.append(f"{number}: expected an empty body with content-length 0")
        elif number == "03":  # trimmed in the capture: names only, plus one full entry of each kind
            got = resp.json()
            for kind in ("importers", "exporters"):
                if [e["name"] for e in got[kind]] != want["body"][kind]:
                    problems.append(f"{number}: {kind} names differ")
            problems += compare_json(want["body"]["_example_exporter_entry_untrimmed"],
                                     next(e for e in got["exporters"] if e["name"] == "COCO 1.0"), cvat.url)
            problems += compare_json(want["body"]["_example_importer_entry_untrimmed"],
                                     next(e for e in got["importers"] if e["name"] == "CVAT 1.1"), cvat.url)
        else:
            problems += [f"{number}: {p}" for p in compare_json(want["body"], resp.json(), cvat.url)]
    elif "body_text" in want:
        if resp.text != want["body_text"]:
            problems.append(f"{number}: text {resp.text!r} != {want['body_text']!r}")
    elif "body_binary" in want:
        binary = want["body_binary"]
        if "html_title" in binary and f"<title>{binary['html_title']}</title>" not in resp.text:
            problems.append(f"{number}: no {binary['html_title']!r} title")
    return problems


def test_replay_captures(cvat: StandinCVAT) -> None:
    tokens = {"54": "0" * 40, "57": cvat.token_of(VIEWER[0]), "58": cvat.token_of(VIEWER[0])}
    problems: list[str] = []
    frames = dict(capture_frames())
    for number in READ_REPLAY:
        cap = load_capture(number)
        if number == "46":
            # the real export worker finished the COCO annotations export of fixture 42 without being polled
            rq = "export:task-18-annotations-in-COCO_1@0-format-by-1"
            polls = [session(cvat).get(f"{cvat.url}/api/requests/{rq}").json()["status"] for _ in range(2)]
            assert polls == ["started", "finished"]
        resp = replay(cvat, cap, tokens)
        problems += check_exchange(cvat, number, cap, resp)
        if number == "01":
            assert resp.json()["key"] == cvat.admin_token
        if number == "30":
            assert hashlib.sha256(resp.content).hexdigest() == hashlib.sha256(frames["IMG_2783.jpg"]).hexdigest()
        if number == "31":
            with Image.open(io.BytesIO(resp.content)) as im:
                assert (im.format, im.size) == ("JPEG", (1008, 756))
            assert resp.content != frames["IMG_2783.jpg"]
        if number in ("36", "41", "46", "47", "50"):
            updated = cvat.task(18).updated.strftime("%Y_%m_%d_%H_%M_%S")
            want = cap["response"]["headers"]["content-disposition"].replace("2026_11_26_16_45_35", updated)
            assert resp.headers["content-disposition"] == want
            names = sorted(zipfile.ZipFile(io.BytesIO(resp.content)).namelist())
            if number in ZIP_NAMES:
                assert names == sorted(zipfile.ZipFile(ZIP_NAMES[number]).namelist())
            else:
                assert names == (["annotations/instances_default.json"] if number == "46" else ["annotations.xml"])
    assert not problems, "\n".join(problems)
    kinds = {e.kind for e in cvat.log}
    assert {"server", "auth", "user", "list", "detail", "meta", "frame", "annotations", "export", "request",
            "download", "unknown"} <= kinds


def test_replay_write_captures() -> None:
    """Fixtures 10-14 (PUT/PATCH annotations, job PATCHes) and 56 (register) replayed on the pre-write state."""
    with StandinCVAT() as cvat:
        setup_capture_session(cvat, with_shapes=False, with_viewer=False)
        problems = []
        for number in ("10", "11", "12", "13", "14", "56", "27", "24"):
            cap = load_capture(number)
            resp = replay(cvat, cap, {})
            problems += check_exchange(cvat, number, cap, resp)
        assert not problems, "\n".join(problems)
        viewer = cvat.user_by_name("capture-viewer")
        assert not viewer.admin and viewer.token != cvat.admin_token


def test_exports_match_real_zips(cvat: StandinCVAT) -> None:
    """The COCO JSON is byte-identical to the real export; the XML differs only in dates and the host."""
    s = session(cvat)
    for fmt, real in (("COCO 1.0", COCO_ZIP), ("CVAT for images 1.1", CVAT_ZIP)):
        rq = s.post(f"{cvat.url}/api/tasks/18/dataset/export", params={"format": fmt, "save_images": "true"})
        rq_id = rq.json()["rq_id"]
        assert s.get(f"{cvat.url}/api/requests/{rq_id}").json()["status"] == "started"
        status = s.get(f"{cvat.url}/api/requests/{rq_id}").json()
        mine = zipfile.ZipFile(io.BytesIO(s.get(status["result_url"]).content))
        theirs = zipfile.ZipFile(real)
        assert sorted(mine.namelist()) == sorted(theirs.namelist())
        for info in mine.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if info.filename.startswith("images/"):
                assert theirs.getinfo(info.filename).file_size > 0
        if fmt == "COCO 1.0":
            name = "annotations/instances_default.json"
            assert mine.read(name) == theirs.read(name)
        else:
            task = cvat.task(18)
            ours = mine.read("annotations.xml").decode()
            real_xml = theirs.read("annotations.xml").decode()
            dumped = ours.split("<dumped>")[1].split("</dumped>")[0]
            ours = (ours.replace(cvat.url, "http://127.0.0.1:8080").replace(dumped, "2026-11-26 16:45:45.181828+00:00")
                    .replace(task.created.isoformat(sep=" "), "2026-11-26 16:45:32.482543+00:00")
                    .replace(task.updated.isoformat(sep=" "), "2026-11-26 16:45:35.077996+00:00"))
            assert ours == real_xml


def test_export_zips_load(cvat: StandinCVAT, tmp_path: Path) -> None:
    s = session(cvat)
    for fmt, save_images in (("COCO 1.0", True), ("CVAT for images 1.1", True), ("COCO 1.0", False)):
        rq_id = s.post(f"{cvat.url}/api/tasks/18/dataset/export",
                       params={"format": fmt, "save_images": str(save_images).lower()}).json()["rq_id"]
        while (status := s.get(f"{cvat.url}/api/requests/{rq_id}").json())["status"] != "finished":
            pass
        path = tmp_path / f"{fmt}-{save_images}.zip"
        path.write_bytes(s.get(status["result_url"]).content)
        ds = load_dataset(path, require_images=save_images, extract_dir=tmp_path / path.stem)
        assert [img.name for img in ds.images] == [name for name, _ in capture_frames()]
        assert ds.label_counts() == {"basophil": 4, "neutrophil": 1, "lymphocyte": 1}
        mask = next(i for img in ds.images for i in img.instances if i.kind == "mask")
        assert int(mask.to_mask(756, 1008).sum()) == 2861
        if fmt == "COCO 1.0":
            coco = COCO(str(tmp_path / path.stem / "annotations" / "instances_default.json"))
            assert len(coco.getAnnIds()) == 6 and coco.annToMask(coco.loadAnns([4])[0]).sum() == 2861


def test_shape_to_instance_mask_roundtrip(cvat: StandinCVAT) -> None:
    shape = next(s for s in capture_shapes() if s["type"] == "mask")
    labels = {lbl.id: lbl for lbl in cvat.task_labels(cvat.task(18))}
    inst = shape_to_instance(shape, labels)
    assert inst is not None and inst.mask_origin == (762, 94) and inst.mask_crop.shape == (53, 69)
    assert np.array_equal(inst.mask_crop, cvat_rle_decode(shape["points"][:-4], 69, 53))


# --- HTTP details ------------------------------------------------------------------------------------------

def raw_get(cvat: StandinCVAT, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", cvat.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_gzip_and_media_type(cvat: StandinCVAT) -> None:
    token = auth(cvat.admin_token)
    status, headers, body = raw_get(cvat, "/api/tasks/18", {**token, "Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert int(headers["content-length"]) == len(body) < 855  # Content-Length is the compressed size
    status, headers, body = raw_get(cvat, "/api/tasks/18", token)
    assert "content-encoding" not in headers and json.loads(body)["id"] == 18
    status, headers, body = raw_get(cvat, "/api/tasks/999", {**token, "Accept-Encoding": "gzip"})  # < 200 B
    assert status == 404 and "content-encoding" not in headers
    status, headers, _ = raw_get(cvat, "/api/tasks/18/data?type=frame&number=0&quality=original",
                                 {**token, "Accept-Encoding": "gzip, deflate"})
    assert headers["content-type"] == "image/jpeg" and headers["content-encoding"] == "gzip"
    for accept in ("*/*", CVAT_JSON, f"{CVAT_JSON}; version=2.0", "application/json, */*"):
        resp = requests.get(f"{cvat.url}/api/tasks/18", headers={**token, "Accept": accept})
        assert resp.status_code == 200 and resp.headers["content-type"] == CVAT_JSON, accept
    resp = requests.get(f"{cvat.url}/api/tasks/18", headers={**token, "Accept": "application/json"})
    assert resp.status_code == 406 and resp.json() == {"detail": "Could not satisfy the request Accept header."}
    resp = requests.get(f"{cvat.url}/api/tasks/18", headers={**token, "Accept": "text/html"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")


def test_trailing_slashes(cvat: StandinCVAT) -> None:
    s = session(cvat)
    for path in ("/api/tasks/", "/api/tasks/18/", "/api/jobs/", "/api/labels/", "/api/projects/6/"):
        resp = s.get(cvat.url + path)
        assert resp.status_code == 404 and resp.headers["content-type"].startswith("text/html"), path
    for path in ("/api/tasks/18/annotations/", "/api/tasks/18/data/meta/", "/api/jobs/22/annotations/",
                 "/api/tasks/18/data/?type=frame&number=1&quality=original"):
        assert s.get(cvat.url + path).status_code == 200, path
    assert s.post(f"{cvat.url}/api/tasks/18/dataset/export/?format=COCO+1.0").status_code == 202
    assert s.get(f"{cvat.url}/api/nothing/here").status_code == 404


def test_pagination(cvat: StandinCVAT) -> None:
    for i in range(12):
        cvat.add_task(f"extra-{i}", frames=[("f.jpg", small_jpeg(1))], labels=["wbc"])
    s = session(cvat)
    first = s.get(f"{cvat.url}/api/tasks").json()
    assert first["count"] == 15 and len(first["results"]) == 10 and first["previous"] is None
    assert first["next"] == f"{cvat.url}/api/tasks?page=2"
    assert [t["id"] for t in first["results"]] == sorted((t["id"] for t in first["results"]), reverse=True)
    page = s.get(f"{cvat.url}/api/tasks?page_size=4&page=3").json()
    assert page["previous"] == f"{cvat.url}/api/tasks?page=2&page_size=4"
    assert page["next"] == f"{cvat.url}/api/tasks?page=4&page_size=4"
    last = s.get(page["next"]).json()
    assert last["next"] is None and len(last["results"]) == 3
    second = s.get(f"{cvat.url}/api/tasks?page=2&page_size=4").json()
    assert second["previous"] == f"{cvat.url}/api/tasks?page_size=4"
    resp = s.get(f"{cvat.url}/api/tasks?page=9")
    assert resp.status_code == 404 and resp.json() == {"detail": "Invalid page."}
    assert s.get(f"{cvat.url}/api/tasks?project_id=6").json()["count"] == 1


def test_auth_and_permissions(cvat: StandinCVAT) -> None:
    url = f"{cvat.url}/api/tasks/18"
    resp = requests.get(url)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Token"
    assert requests.get(url, headers=auth("nope")).json() == {"detail": "Invalid token."}
    assert requests.get(url, auth=("admin", "wrong")).status_code == 401
    assert requests.get(url, auth=("admin", "admin")).status_code == 200
    assert requests.get(f"{cvat.url}/api/server/about").status_code == 200  # public
    key = requests.post(f"{cvat.url}/api/auth/login", json={"username": "admin", "password": "admin"}).json()["key"]
    assert key == cvat.admin_token == requests.post(f"{cvat.url}/api/auth/login",
                                                    json={"username": "admin", "password": "admin"}).json()["key"]
    bad = requests.post(f"{cvat.url}/api/auth/login", json={"username": "admin", "password": "x"})
    assert bad.status_code == 400 and "non_field_errors" in bad.json()
    viewer = auth(cvat.token_of(VIEWER[0]))
    assert requests.get(url, headers=viewer).status_code == 403
    assert requests.get(f"{cvat.url}/api/jobs/22", headers=viewer).status_code == 403
    assert requests.get(f"{cvat.url}/api/tasks", headers=viewer).json()["count"] == 0
    assert requests.get(f"{cvat.url}/api/jobs?task_id=18", headers=viewer).json()["count"] == 0
    cvat.set_job_state(23, assignee=VIEWER[0])  # an assignee of one job sees the task
    assert requests.get(url, headers=viewer).status_code == 200
    assert requests.get(f"{cvat.url}/api/tasks", headers=viewer).json()["count"] == 1


def test_bearer_only_on_newer_versions() -> None:
    for version, accepted in (("2.23.1", False), ("2.32.0", True)):
        with StandinCVAT(version=version) as cvat:
            cvat.add_task("t", frames=[("a.jpg", small_jpeg(2))], labels=["wbc"])
            pat = cvat.add_access_token("admin")
            resp = requests.get(f"{cvat.url}/api/tasks/1", headers={"Authorization": f"Bearer {pat}"})
            assert resp.status_code == (200 if accepted else 401), version
            if not accepted:
                assert resp.json() == {"detail": "Authentication credentials were not provided."}
            else:
                bad = requests.get(f"{cvat.url}/api/tasks/1", headers={"Authorization": "Bearer nope"})
                assert bad.status_code == 401
            assert requests.get(f"{cvat.url}/api/server/about").json()["version"] == version


def test_newer_version_export_flow() -> None:
    with StandinCVAT(version="2.32.0") as cvat:
        tid = cvat.add_task("t", frames=[("a.jpg", small_jpeg(2))], labels=[{"name": "wbc", "type": "polygon"}])
        s = session(cvat)
        assert s.get(f"{cvat.url}/api/tasks/{tid}/dataset?format=COCO+1.0").status_code == 404
        assert s.get(f"{cvat.url}/api/tasks/{tid}/annotations?format=COCO+1.0&action=download").status_code == 404
        rq_id = s.post(f"{cvat.url}/api/tasks/{tid}/dataset/export?format=COCO+1.0&save_images=true").json()["rq_id"]
        assert rq_id.startswith("action=export&target=task&target_id=1&user_id=1&format=COCO_1~0")
        s.get(f"{cvat.url}/api/requests/{quote(rq_id, safe='')}")
        status = s.get(f"{cvat.url}/api/requests/{quote(rq_id, safe='')}").json()
        assert status["result_url"].startswith(f"{cvat.url}/api/tasks/1/dataset/download?rq_id=")
        resp = s.get(status["result_url"])
        assert resp.status_code == 200
        assert "images/default/a.jpg" in zipfile.ZipFile(io.BytesIO(resp.content)).namelist()


def test_export_flows(cvat: StandinCVAT) -> None:
    s = session(cvat)
    base = f"{cvat.url}/api/tasks/18"
    bogus = s.post(f"{base}/dataset/export?format=Bogus+Format+9.9")
    assert bogus.status_code == 400 and bogus.json() == ["Unknown format specified for the request"]
    # legacy annotations-only flow: 202, 201 (no content type), then the zip once
    url = f"{base}/annotations?format=CVAT+for+images+1.1"
    first = s.get(url)
    assert first.status_code == 202 and first.json() == {
        "rq_id": "export:task-18-annotations-in-CVAT_for_images_1@1-format-by-1"}
    ready = s.get(url)
    assert ready.status_code == 201 and ready.content == b"" and "content-type" not in ready.headers
    zipped = s.get(url + "&action=download")
    assert zipped.status_code == 200 and zipfile.ZipFile(io.BytesIO(zipped.content)).namelist() == ["annotations.xml"]
    again = s.get(url + "&action=download")
    assert again.status_code == 400 and again.headers["content-type"] == "text/html; charset=utf-8"
    # a finished export goes stale when the task changes: the legacy flow starts over
    assert s.get(f"{base}/dataset?format=COCO+1.0").status_code == 202
    assert s.get(f"{base}/dataset?format=COCO+1.0").status_code == 201
    cvat.add_shapes(18, [{"type": "rectangle", "frame": 5, "label_id": 118, "points": [1, 2, 30, 40]}])
    assert s.get(f"{base}/dataset?format=COCO+1.0&action=download").status_code == 400
    # the new flow: 409 only while queued/started; a finished one is replaced
    post = f"{base}/dataset/export?format=COCO+1.0&save_images=false"
    rq_id = s.post(post).json()["rq_id"]
    assert s.post(post).status_code == 409
    assert s.get(f"{cvat.url}/api/requests/{rq_id}").json()["status"] == "started"
    assert s.post(post).status_code == 409
    done = s.get(f"{cvat.url}/api/requests/{rq_id}").json()
    assert done["status"] == "finished" and done["result_url"].endswith("/annotations?format=COCO+1.0&save_images"
                                                                         "=false&action=download")
    assert s.post(post).status_code == 202
    assert s.get(f"{cvat.url}/api/requests/{rq_id}").json()["status"] == "started"


def test_export_polls_setting() -> None:
    with StandinCVAT(export_polls=3) as cvat:
        tid = cvat.add_task("t", frames=[("a.jpg", small_jpeg(3))], labels=["wbc"])
        s = session(cvat)
        rq_id = s.post(f"{cvat.url}/api/tasks/{tid}/dataset/export?format=COCO+1.0").json()["rq_id"]
        seen = [s.get(f"{cvat.url}/api/requests/{rq_id}").json()["status"] for _ in range(4)]
        assert seen == ["queued", "queued", "started", "finished"]
        assert s.get(f"{cvat.url}/api/requests/{rq_id}").json()["started_date"] is not None


# --- state -------------------------------------------------------------------------------------------------

def test_builder_dates_meta_and_jobs(cvat: StandinCVAT) -> None:
    s = session(cvat)
    before = s.get(f"{cvat.url}/api/tasks/18").json()["updated_date"]
    cvat.set_job_state(23, state="completed")
    assert s.get(f"{cvat.url}/api/tasks/18").json()["updated_date"] == before  # as in the captures
    job = s.get(f"{cvat.url}/api/jobs/23").json()
    assert (job["state"], job["stage"], job["status"]) == ("completed", "annotation", "annotation")
    cvat.set_job_state(23, stage="validation")
    assert s.get(f"{cvat.url}/api/jobs/23").json()["state"] == "new"
    cvat.delete_frames(18, [5])
    meta = s.get(f"{cvat.url}/api/tasks/18/data/meta").json()
    assert meta["deleted_frames"] == [5] and meta["size"] == 6
    after = s.get(f"{cvat.url}/api/tasks/18").json()["updated_date"]
    assert after > before
    rq_id = s.post(f"{cvat.url}/api/tasks/18/dataset/export?format=COCO+1.0&save_images=true").json()["rq_id"]
    s.get(f"{cvat.url}/api/requests/{rq_id}")
    url = s.get(f"{cvat.url}/api/requests/{rq_id}").json()["result_url"]
    names = zipfile.ZipFile(io.BytesIO(s.get(url).content)).namelist()
    assert "images/default/IMG_2995.jpg" not in names and "images/default/IMG_2994.jpg" in names
    with pytest.raises(StateError):
        cvat.set_annotations(18, [{"type": "polygon", "frame": 0, "label_id": 999, "points": [0, 0, 1, 1, 2, 0]}])
    with pytest.raises(StateError):
        cvat.set_annotations(18, [{"type": "mask", "frame": 0, "label_id": 120, "points": [3, 2, 0, 0, 1, 1]}])
    job_ann = s.get(f"{cvat.url}/api/jobs/22/annotations").json()
    assert {sh["frame"] for sh in job_ann["shapes"]} == {0, 1, 2}
    mask = next(sh for sh in job_ann["shapes"] if sh["type"] == "mask")
    assert all(isinstance(v, float) for v in mask["points"]) and mask["points"][-4:] == [762.0, 94.0, 830.0, 146.0]


def test_org_scoping(cvat: StandinCVAT) -> None:
    cvat.add_user("alice", "pw")
    cvat.add_org("lab", members=["alice"])
    cvat.add_org("other")
    lab_task = cvat.add_task("lab task", frames=[("a.jpg", small_jpeg(4))], labels=["wbc"], org="lab")
    other_task = cvat.add_task("other task", frames=[("b.jpg", small_jpeg(5))], labels=["wbc"], org="other")
    admin, alice = session(cvat), session(cvat, cvat.token_of("alice"))
    lab = {"X-Organization": "lab"}
    listed = admin.get(f"{cvat.url}/api/tasks", headers=lab).json()
    assert [t["id"] for t in listed["results"]] == [lab_task]
    assert listed["results"][0]["organization"] == cvat.org_by_slug("lab").id  # type: ignore[union-attr]
    assert admin.get(f"{cvat.url}/api/tasks/{other_task}", headers=lab).status_code == 404
    assert admin.get(f"{cvat.url}/api/tasks/18", headers=lab).status_code == 404
    assert admin.get(f"{cvat.url}/api/tasks?org=lab").json()["count"] == 1
    assert admin.get(f"{cvat.url}/api/tasks").json()["count"] == 5  # admin, no org context: everything
    unknown = admin.get(f"{cvat.url}/api/tasks", headers={"X-Organization": "nope"})
    assert unknown.status_code == 404 and unknown.json() == {"detail": "nope organization does not exist."}
    assert admin.get(f"{cvat.url}/api/server/about", headers={"X-Organization": "nope"}).status_code == 200
    assert admin.get(f"{cvat.url}/api/tasks?org=other", headers=lab).status_code == 400
    assert alice.get(f"{cvat.url}/api/tasks", headers=lab).json()["count"] == 1
    assert alice.get(f"{cvat.url}/api/tasks").json()["count"] == 0  # personal workspace
    assert alice.get(f"{cvat.url}/api/tasks/{lab_task}").status_code == 200
    assert alice.get(f"{cvat.url}/api/tasks/{other_task}").status_code == 403
    assert alice.get(f"{cvat.url}/api/tasks", headers={"X-Organization": "other"}).status_code == 403
    assert alice.get(f"{cvat.url}/api/jobs", headers=lab).json()["count"] == 1


@pytest.mark.skipif(not RVPBS.is_dir(), reason="RV-PBS annotations not found")
def test_task_from_cvat_xml(cvat: StandinCVAT, tmp_path: Path) -> None:
    tid = task_from_cvat_xml(cvat, RVPBS / "MONOCYTES.xml", (1008, 756), max_frames=5, segment_size=2)
    s = session(cvat)
    task = s.get(f"{cvat.url}/api/tasks/{tid}").json()
    assert (task["name"], task["size"], task["jobs"]["count"]) == ("MONOCYTES 4", 5, 3)
    meta = s.get(f"{cvat.url}/api/tasks/{tid}/data/meta").json()
    assert {(f["width"], f["height"]) for f in meta["frames"]} == {(1008, 756)}
    labels = s.get(f"{cvat.url}/api/labels?task_id={tid}&page_size=20").json()
    assert labels["count"] == 11 and labels["results"][0]["name"] == "bg"
    shapes = s.get(f"{cvat.url}/api/tasks/{tid}/annotations").json()["shapes"]
    assert shapes and all(sh["type"] == "polygon" for sh in shapes)
    pts = np.asarray([p for sh in shapes for p in sh["points"]]).reshape(-1, 2)
    assert pts.min() >= 0 and pts[:, 0].max() <= 1008 and pts[:, 1].max() <= 756
    rq_id = s.post(f"{cvat.url}/api/tasks/{tid}/dataset/export?format=CVAT+for+images+1.1&save_images=true").json()
    s.get(f"{cvat.url}/api/requests/{rq_id['rq_id']}")
    url = s.get(f"{cvat.url}/api/requests/{rq_id['rq_id']}").json()["result_url"]
    (tmp_path / "x.zip").write_bytes(s.get(url).content)
    ds = load_dataset(tmp_path / "x.zip", require_images=True, extract_dir=tmp_path / "x")
    assert len(ds) == 5 and sum(ds.label_counts().values()) == len(shapes)


# --- faults and the log ------------------------------------------------------------------------------------

def test_status_and_throttle_faults(cvat: StandinCVAT) -> None:
    s = session(cvat)
    cvat.add_fault("status", "frame", status=502, times=1)
    cvat.add_fault("status", "frame", status=503, times=1)
    cvat.add_fault("status", "annotations", status=500, times=1)
    frame = f"{cvat.url}/api/tasks/18/data?type=frame&number=0&quality=original"
    first, second = s.get(frame), s.get(frame)
    assert (first.status_code, second.status_code) == (502, 503)
    assert "<title>502 Bad Gateway</title>" in first.text and first.headers["server"] == "nginx"
    assert s.get(frame).status_code == 200
    assert [(f.seen, f.fired) for f in cvat.faults.active()] == [(1, 1), (1, 1), (0, 0)]
    assert s.get(f"{cvat.url}/api/tasks/18").status_code == 200  # another route kind
    err = s.get(f"{cvat.url}/api/tasks/18/annotations")
    assert err.status_code == 500 and "Server Error (500)" in err.text
    cvat.add_fault("throttle", "any", retry_after=7, times=1)
    throttled = s.get(f"{cvat.url}/api/tasks/18")
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "7"
    assert throttled.json() == {"detail": "Request was throttled. Expected available in 7 seconds."}
    assert s.get(f"{cvat.url}/api/tasks/18").status_code == 200


def test_connection_faults(cvat: StandinCVAT) -> None:
    s = session(cvat)
    frame = f"{cvat.url}/api/tasks/18/data?type=frame&number=0&quality=original"
    cvat.add_fault("reset", "frame", times=1)
    with pytest.raises(requests.ConnectionError):
        s.get(frame)
    assert s.get(frame).status_code == 200
    cvat.add_fault("truncate", "frame", times=1, fraction=0.3)
    with pytest.raises(requests.exceptions.RequestException):
        s.get(frame, headers={"Accept-Encoding": "identity"})
    assert raw_get(cvat, "/api/tasks/18", auth(cvat.admin_token))[0] == 200
    # a dropped download: a chunked zip that stops half way
    rq_id = s.post(f"{cvat.url}/api/tasks/18/dataset/export?format=COCO+1.0&save_images=true").json()["rq_id"]
    s.get(f"{cvat.url}/api/requests/{rq_id}")
    url = s.get(f"{cvat.url}/api/requests/{rq_id}").json()["result_url"]
    cvat.add_fault("drop", "download", times=1)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        s.get(url, headers={"Accept-Encoding": "identity"})
    drop = cvat.log_where(kind="download")[-1]
    full = sum(len(data) for _, data in capture_frames())
    assert drop.fault == "drop" and not drop.gzip and 0 < drop.bytes < full
    # as in CVAT, the request was consumed by the (failed) download: the client must export again
    assert s.get(url).status_code == 400
    assert [e.fault for e in cvat.log_where(kind="frame")][:2] == ["reset", None]


def test_delay_and_export_fail_faults(cvat: StandinCVAT) -> None:
    s = session(cvat)
    cvat.add_fault("delay", "meta", delay=0.3, times=1)
    t0 = time.perf_counter()
    assert s.get(f"{cvat.url}/api/tasks/18/data/meta").status_code == 200
    assert time.perf_counter() - t0 >= 0.3
    cvat.add_fault("export_fail", "export", times=1, message="RuntimeError: disk full")
    post = f"{cvat.url}/api/tasks/18/dataset/export?format=COCO+1.0&save_images=true"
    rq_id = s.post(post).json()["rq_id"]
    s.get(f"{cvat.url}/api/requests/{rq_id}")
    failed = s.get(f"{cvat.url}/api/requests/{rq_id}").json()
    assert (failed["status"], failed["message"], failed["result_url"]) == ("failed", "RuntimeError: disk full", None)
    assert s.post(post).status_code == 202  # a failed request is replaced
    cvat.add_fault("export_fail", "export", times=1)
    legacy = f"{cvat.url}/api/tasks/18/annotations?format=COCO+1.0"
    assert s.get(legacy).status_code == 202
    broken = s.get(legacy)
    assert broken.status_code == 500 and "stand-in fault" in broken.json()


def test_fault_rates_are_seeded() -> None:
    def pattern(seed: int) -> list[int]:
        with StandinCVAT(seed=seed) as cvat:
            cvat.add_fault("status", "server", rate=0.3, status=503)
            return [requests.get(f"{cvat.url}/api/server/about").status_code for _ in range(30)]

    a, b = pattern(7), pattern(7)
    assert a == b and 503 in a and 200 in a
    assert pattern(8) != a


def test_request_log(cvat: StandinCVAT) -> None:
    cvat.reset_log()
    s = session(cvat)
    s.get(f"{cvat.url}/api/tasks", headers={"Accept-Encoding": "identity"})
    s.get(f"{cvat.url}/api/tasks/18/data?type=frame&number=2&quality=original", headers={"Accept-Encoding": "identity"})
    s.get(f"{cvat.url}/api/tasks/")
    log = cvat.log
    assert [(e.method, e.path, e.status, e.kind) for e in log] == [
        ("GET", "/api/tasks", 200, "list"), ("GET", "/api/tasks/18/data", 200, "frame"),
        ("GET", "/api/tasks/", 404, "unknown")]
    assert log[1].bytes == len(dict(capture_frames())["IMG_2799.jpg"]) and log[1].user == "admin"
    assert log[1].query == "type=frame&number=2&quality=original"
    assert cvat.bytes_sent("frame") == log[1].bytes
    cvat.reset_log()
    assert cvat.log == []


def test_keep_alive_and_concurrency(cvat: StandinCVAT) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cvat.port, timeout=10)
    try:
        for _ in range(3):  # one connection, several requests (HTTP/1.1 keep-alive)
            conn.request("GET", "/api/tasks/18/data/meta", headers=auth(cvat.admin_token))
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["size"] == 6
    finally:
        conn.close()
    from concurrent.futures import ThreadPoolExecutor

    s = session(cvat)

    def fetch(i: int) -> int:
        if i % 10 == 0:
            cvat.add_shapes(18, [{"type": "rectangle", "frame": i % 6, "label_id": 118, "points": [1, 1, 9, 9]}])
        return s.get(f"{cvat.url}/api/tasks/18/data?type=frame&number={i % 6}&quality=compressed").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(fetch, range(60))) == {200}
    assert len(cvat.task(18).shapes) == 12
    head = s.head(f"{cvat.url}/api/tasks/18")
    assert head.status_code == 200 and head.content == b""
    assert s.post(f"{cvat.url}/api/tasks/18").status_code == 405
