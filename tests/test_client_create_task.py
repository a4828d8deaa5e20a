"""cvat_sync's task creation (CvatClient.create_task / upload_task_images / delete_task) over real HTTP against the
CVAT stand-in on 127.0.0.1, including what happens when a POST breaks off: it is never sent twice."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cvat_sync.client import (
    AccessDenied,
    CvatClient,
    NotFound,
    OutcomeUnknown,
    RetryPolicy,
    ServerUnavailable,
    TaskCreateError,
)
from cvat_sync.config import Secret, Settings
from tests.cvat_standin import StandinCVAT

FAST = RetryPolicy(attempts=4, backoff=0.01, max_wait=0.05, connect_timeout=5, read_timeout=10)
LABELS = [{"name": "wbc", "type": "polygon", "attributes": []},
          {"name": "neutrophil", "color": "#b83df5", "type": "mask",
           "attributes": [{"name": "lobes", "mutable": False, "input_type": "number", "default_value": "3",
                           "values": ["1", "6", "1"]}]}]


def jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture
def cvat() -> Iterator[StandinCVAT]:
    with StandinCVAT() as server:
        yield server


def client_for(cvat: StandinCVAT, token: str | None = None, retry: RetryPolicy = FAST) -> CvatClient:
    return CvatClient(Settings(url=cvat.url, token=Secret(token or cvat.admin_token)), retry=retry)


@pytest.fixture
def client(cvat: StandinCVAT) -> Iterator[CvatClient]:
    with client_for(cvat) as c:
        yield c


def posts(cvat: StandinCVAT, data: bool = False) -> list[Any]:
    """The logged POSTs of task creation (``data``: the uploads, else ``POST /api/tasks``)."""
    return [e for e in cvat.log_where(kind="create", method="POST") if e.path.endswith("/data") == data]


def test_create_upload_wait(cvat: StandinCVAT, client: CvatClient) -> None:
    task = client.create_task("next 5 by uncertainty", LABELS, segment_size=2)
    tid = task["id"]
    assert task["name"] == "next 5 by uncertainty" and task["mode"] == "" and task["segment_size"] == 2
    names = ["IMG_0009.jpg", "IMG_0002.jpg", "IMG_0007.jpg", "IMG_0001.jpg", "IMG_0004.jpg"]  # ranked order
    files = [(n, jpeg(i)) for i, n in enumerate(names)]
    assert client.upload_task_images(tid, files, image_quality=55, poll_seconds=0.01) is None
    stored = cvat.task(tid)
    assert [f.name for f in stored.frames] == names  # predefined: kept in the given order
    assert [f.data for f in stored.frames] == [d for _, d in files]
    assert stored.image_quality == 55
    assert sorted((cvat.jobs[j].start_frame, cvat.jobs[j].stop_frame) for j in stored.jobs) == [(0, 1), (2, 3), (4, 4)]
    labels = {lab.name: lab for lab in cvat.task_labels(stored)}
    assert labels["neutrophil"].type == "mask" and labels["neutrophil"].color == "#b83df5"
    assert labels["neutrophil"].attributes[0]["values"] == ["1", "6", "1"]
    assert client.get_json(f"/api/tasks/{tid}")["size"] == 5
    assert len(posts(cvat)) == 1 and len(posts(cvat, data=True)) == 1
    polls = cvat.log_where(kind="request")
    assert [e.path for e in polls] == [f"/api/requests/create:task-{tid}"] * 2  # started, then finished


def test_sorting_method_is_sent(cvat: StandinCVAT, client: CvatClient) -> None:
    tid = client.create_task("sorted", LABELS)["id"]
    client.upload_task_images(tid, [("b.jpg", jpeg(1)), ("a.jpg", jpeg(2))], sorting_method="lexicographical",
                              poll_seconds=0.01)
    assert [f.name for f in cvat.task(tid).frames] == ["a.jpg", "b.jpg"]


def test_task_in_a_project_uses_its_labels(cvat: StandinCVAT, client: CvatClient) -> None:
    pid = cvat.add_project("wbc project", labels=[{"name": "basophil", "type": "polygon"}])
    task = client.create_task("in project", None, project_id=pid)
    assert task["project_id"] == pid
    client.upload_task_images(task["id"], [("x.jpg", jpeg(1))], poll_seconds=0.01)
    labels = list(client.paginate("/api/labels", {"task_id": task["id"]}))
    assert [(lab["name"], lab.get("project_id")) for lab in labels] == [("basophil", pid)]
    with pytest.raises(TaskCreateError, match="Project must have only one of Label set or project_id"):
        client.create_task("both", LABELS, project_id=pid)


def test_refusals_carry_the_server_reason(cvat: StandinCVAT, client: CvatClient) -> None:
    with pytest.raises(TaskCreateError) as err:
        client.create_task("", [{"name": "ok"}, {"color": "#ffffff"}])
    assert err.value.status == 400
    assert "name: This field may not be blank.; labels[1].name: This field is required." in str(err.value)
    with pytest.raises(TaskCreateError, match="Label set or project_id must be present"):
        client.create_task("no labels")
    with pytest.raises(TaskCreateError, match=r"Could not find project with provided id: 404"):
        client.create_task("lost", None, project_id=404)
    assert not cvat.tasks
    tid = client.create_task("t", LABELS)["id"]
    client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
    with pytest.raises(TaskCreateError, match="Adding more data is not supported"):
        client.upload_task_images(tid, [("b.jpg", jpeg(2))], poll_seconds=0.01)
    assert cvat.admin_token not in str(err.value)


def test_failed_request_surfaces_the_server_message(cvat: StandinCVAT, client: CvatClient) -> None:
    tid = client.create_task("bad bytes", LABELS)["id"]
    with pytest.raises(TaskCreateError) as err:
        client.upload_task_images(tid, [("good.jpg", jpeg(1)), ("bad.jpg", b"<html>not an image</html>")],
                                  poll_seconds=0.01)
    assert str(err.value) == (f"CVAT could not create the data of task {tid}: "
                              "PIL.UnidentifiedImageError: cannot identify image file 'bad.jpg'")
    assert not cvat.task(tid).has_data
    cvat.add_fault("export_fail", "create", message="OSError: [Errno 28] No space left on device")
    tid = client.create_task("disk full", LABELS)["id"]
    with pytest.raises(TaskCreateError, match=r"No space left on device"):
        client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)


def test_wait_times_out() -> None:
    with StandinCVAT(export_polls=10_000) as cvat, client_for(cvat) as client:
        tid = client.create_task("slow", LABELS)["id"]
        with pytest.raises(TaskCreateError, match=r"not ready after 0.2 s \(request create:task-\d+ still queued\)"):
            client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.02, timeout_s=0.2)
        assert 3 <= len(cvat.log_where(kind="request")) <= 20


def test_delete_task(cvat: StandinCVAT, client: CvatClient) -> None:
    tid = client.create_task("to delete", LABELS)["id"]
    client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
    client.delete_task(tid)
    assert tid not in cvat.tasks
    with pytest.raises(NotFound):
        client.delete_task(tid)
    # DELETE is repeated on a broken connection ...
    tid = client.create_task("flaky", LABELS)["id"]
    fault = cvat.add_fault("reset", "update", method="DELETE", times=1)
    client.delete_task(tid)
    assert tid not in cvat.tasks and fault.fired == 1
    assert [e.status for e in cvat.log_where(method="DELETE") if e.path == f"/api/tasks/{tid}"] == [0, 204]
    # ... and a 404 after a repeat means an earlier try did delete it (here: gone before the repeat arrives)
    tid = client.create_task("gone meanwhile", LABELS)["id"]
    cvat.add_fault("reset", "update", method="DELETE", times=1)
    cvat.remove_task(tid)
    client.delete_task(tid)
    assert [e.status for e in cvat.log_where(method="DELETE") if e.path == f"/api/tasks/{tid}"] == [0, 404]


def test_permissions(cvat: StandinCVAT, client: CvatClient) -> None:
    token = cvat.add_user("viewer", "pw")
    tid = client.create_task("admin's", LABELS)["id"]
    with client_for(cvat, token) as viewer:
        mine = viewer.create_task("viewer's", LABELS)
        assert mine["owner"]["username"] == "viewer"
        with pytest.raises(AccessDenied, match="no permission to upload images to task"):
            viewer.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
        with pytest.raises(AccessDenied, match="no permission to delete task"):
            viewer.delete_task(tid)
    assert tid in cvat.tasks


# --- a POST is never sent twice once the server may have acted ----------------------------------------------

def test_reset_create_is_not_repeated(cvat: StandinCVAT, client: CvatClient) -> None:
    cvat.add_fault("reset", "create", method="POST", times=1)
    with pytest.raises(OutcomeUnknown, match="CVAT may have acted on it, so it was not sent again"):
        client.create_task("once", LABELS)
    assert [e.status for e in posts(cvat)] == [0]
    assert not cvat.tasks  # the stand-in's reset comes before the handler; a client cannot know that


def test_cut_off_answer_after_the_server_acted_is_not_repeated(cvat: StandinCVAT, client: CvatClient) -> None:
    cvat.add_fault("truncate", "create", method="POST", times=1)
    with pytest.raises(OutcomeUnknown) as err:
        client.create_task("created, answer lost", LABELS)
    assert cvat.admin_token not in str(err.value)
    assert [e.status for e in posts(cvat)] == [201]
    assert [t.name for t in cvat.tasks.values()] == ["created, answer lost"]  # one task, not two
    tid = next(iter(cvat.tasks))
    cvat.add_fault("drop", "create", path_contains="/data", times=1)
    with pytest.raises(OutcomeUnknown):
        client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
    assert [e.status for e in posts(cvat, data=True)] == [202]
    assert list(cvat.requests) == [f"create:task-{tid}"]


def test_proxy_errors_on_a_post_are_not_repeated(cvat: StandinCVAT, client: CvatClient) -> None:
    for status in (502, 503, 504, 500):
        cvat.clear_faults()
        cvat.reset_log()
        cvat.add_fault("status", "create", method="POST", status=status, times=1)
        with pytest.raises(OutcomeUnknown) as err:
            client.create_task(f"after {status}", LABELS)
        assert err.value.status == status and len(posts(cvat)) == 1


def test_refusals_that_prove_nothing_happened_are_retried(cvat: StandinCVAT, client: CvatClient) -> None:
    cvat.add_fault("throttle", "create", method="POST", times=1, retry_after=0)
    tid = client.create_task("throttled once", LABELS)["id"]
    assert [e.status for e in posts(cvat)] == [429, 201] and list(cvat.tasks) == [tid]
    cvat.add_fault("throttle", "create", path_contains="/data", times=2, retry_after=0)
    client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
    assert [e.status for e in posts(cvat, data=True)] == [429, 429, 202] and cvat.task(tid).has_data


def test_polls_are_still_retried(cvat: StandinCVAT, client: CvatClient) -> None:
    tid = client.create_task("flaky polls", LABELS)["id"]
    fault = cvat.add_fault("status", "request", status=502, times=2)
    reset = cvat.add_fault("reset", "request", times=1)
    client.upload_task_images(tid, [("a.jpg", jpeg(1))], poll_seconds=0.01)
    assert cvat.task(tid).has_data and fault.fired == 2 and reset.fired == 1


def test_refused_connection_is_retried_even_for_a_post() -> None:
    """A connection that could not be opened proves nothing was sent: retried, then ServerUnavailable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(url=f"http://127.0.0.1:{port}", token=Secret("0" * 40))
    with CvatClient(settings, retry=FAST) as client:
        with pytest.raises(ServerUnavailable, match="failed 4 times"):
            client.create_task("nobody home", LABELS)
        assert client.requests_made == 4


def test_bad_input_is_refused_before_any_request(cvat: StandinCVAT, client: CvatClient) -> None:
    tid = client.create_task("t", LABELS)["id"]
    cvat.reset_log()
    for files, kwargs, message in (
        ([], {}, "no images to upload"),
        ([("a.jpg", jpeg(1)), ("a.jpg", jpeg(2))], {}, "must be unique"),
        ([("dir/a.jpg", jpeg(1))], {}, "plain file name"),
        ([("a.jpg", jpeg(1))], {"sorting_method": "by size"}, "sorting_method must be one of"),
        ([("a.jpg", jpeg(1))], {"image_quality": 101}, "image_quality must be 0..100"),
    ):
        with pytest.raises(ValueError, match=message):
            client.upload_task_images(tid, files, **kwargs)
    assert cvat.log == []
