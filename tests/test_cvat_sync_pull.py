"""cvat_sync end to end: the real client over real HTTP against the CVAT stand-in on 127.0.0.1."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import cvat_sync.store as store
from cvat_sync.__main__ import main as cli
from cvat_sync.client import CvatClient, RetryPolicy
from cvat_sync.config import Secret, Settings
from cvat_sync.pull import PullOptions, pull_tasks
from tests.cvat_standin import StandinCVAT
from wbc_core.data.loader import load_dataset
from wbc_core.data.masks import cvat_rle_encode
from wbc_core.labels import RVPBS_LABELS

REPO = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=8, backoff=0.01, max_wait=0.05, connect_timeout=5, read_timeout=10)
LABELS = [{"name": n, "type": "mask" if n == "neutrophil" else "polygon"} for n in RVPBS_LABELS]


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(150, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def mask_points(left: int, top: int, crop: np.ndarray) -> list[float]:
    h, w = crop.shape
    return [float(v) for v in cvat_rle_encode(crop)] + [left, top, left + w - 1, top + h - 1]


def make_task(cvat: StandinCVAT, n_frames: int = 6, segment: int = 3, name: str = "slides", **kw: Any) -> int:
    frames = [(f"IMG_{i:04d}.jpg", jpeg(i)) for i in range(n_frames)]
    tid = cvat.add_task(name, frames=frames, labels=LABELS, segment_size=segment, **kw)
    ids = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(tid))}
    disc = np.zeros((20, 24), bool)
    disc[2:18, 3:21] = True
    shapes = []
    for f in range(n_frames):
        shapes.append({"type": "polygon", "frame": f, "label_id": ids["basophil"],
                       "points": [40.0 + f, 40.0, 90.0, 45.5, 80.0, 100.25, 35.0, 90.0]})
        if f % 2 == 0:
            shapes.append({"type": "mask", "frame": f, "label_id": ids["neutrophil"],
                           "points": mask_points(150 + f, 60, disc), "source": "auto"})
        if f % 3 == 1:
            shapes.append({"type": "rectangle", "frame": f, "label_id": ids["lymphocyte"],
                           "points": [200.0, 150.0, 260.5, 210.25]})
    cvat.set_annotations(tid, shapes)
    return tid


def jobs_of(cvat: StandinCVAT, tid: int) -> list[int]:
    return sorted(cvat.task(tid).jobs)


def settings(cvat: StandinCVAT, **kw: Any) -> Settings:
    kw.setdefault("token", Secret(cvat.admin_token))
    return Settings(url=cvat.url, **kw)


def pull(cvat: StandinCVAT, tid: int, out: Path, **kw: Any) -> Any:
    opts = PullOptions(out=out, progress=False, export_poll_s=0.01, **kw)
    with CvatClient(settings(cvat), retry=FAST) as client:
        return pull_tasks(client, [tid], opts)[0]


def env_for(cvat: StandinCVAT, **extra: str) -> dict[str, str]:
    return {"CVAT_URL": cvat.url, "CVAT_TOKEN": cvat.admin_token or "", "HOME": "/nonexistent", **extra}


@pytest.fixture
def cvat() -> Any:
    with StandinCVAT(seed=1) as server:
        yield server


@pytest.fixture
def task(cvat: StandinCVAT) -> int:
    tid = make_task(cvat)
    first, second = jobs_of(cvat, tid)
    cvat.set_job_state(first, state="completed")
    cvat.set_job_state(second, state="in progress")
    return tid


# --- the happy path ------------------------------------------------------------------------------

def test_pull_writes_a_dataset_the_trainer_reads(cvat: StandinCVAT, task: int, tmp_path: Path) -> None:
    report = pull(cvat, task, tmp_path)
    assert report.status == "pulled" and report.frames == 3 and report.downloaded == 3
    assert report.skipped_frames == {"in jobs that are not completed": 3}
    folder = tmp_path / f"task-{task}"
    data = load_dataset(folder, label_map=None, require_images=True)
    assert [r.name for r in data.images] == ["IMG_0000.jpg", "IMG_0001.jpg", "IMG_0002.jpg"]
    for i, rec in enumerate(data.images):  # byte-identical to what was uploaded to CVAT
        assert Path(rec.path).read_bytes() == jpeg(i)
    kinds = sorted(inst.kind for rec in data.images for inst in rec.instances)
    assert kinds == ["mask", "mask", "polygon", "polygon", "polygon", "rectangle"]
    mask = next(i for r in data.images for i in r.instances if i.kind == "mask")
    assert mask.label == "neutrophil" and int(mask.mask_crop.sum()) == 16 * 18
    # the function's untouched cells stay "auto" in the training set (the retrain gate needs to know them)
    assert {(i.kind, i.source) for r in data.images for i in r.instances} == \
        {("mask", "auto"), ("polygon", "manual"), ("rectangle", "manual")}
    prov = json.loads((folder / "cvat_sync.json").read_text())
    assert prov["server"] == cvat.url and prov["server_version"] == "2.23.1"
    assert prov["task"]["id"] == task and prov["jobs_filter"] == "completed" and prov["pulled_at"]
    assert [j["admitted"] for j in prov["jobs"]] == [True, False]
    assert all(len(f["sha256"]) == 64 for f in prov["frames"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir())  # no staging left
    token = cvat.admin_token or ""
    assert all(token not in p.read_text(errors="ignore") for p in folder.rglob("*.json"))


def test_unchanged_repull_makes_few_requests_and_moves_no_image_bytes(cvat: StandinCVAT, task: int,
                                                                      tmp_path: Path) -> None:
    pull(cvat, task, tmp_path)
    before = (tmp_path / f"task-{task}" / "cvat_sync.json").stat().st_mtime_ns
    cvat.reset_log()
    report = pull(cvat, task, tmp_path)
    assert report.status == "unchanged" and report.frames == 3
    assert len(cvat.log) <= 5 and cvat.bytes_sent("frame") == 0
    assert (tmp_path / f"task-{task}" / "cvat_sync.json").stat().st_mtime_ns == before  # nothing rewritten


def test_a_changed_task_is_refreshed_reusing_verified_frames(cvat: StandinCVAT, task: int, tmp_path: Path) -> None:
    pull(cvat, task, tmp_path)
    second = jobs_of(cvat, task)[1]
    cvat.set_job_state(second, state="completed")  # 3 more frames admitted
    cvat.reset_log()
    report = pull(cvat, task, tmp_path)
    assert report.status == "pulled" and report.frames == 6 and report.reused == 3 and report.downloaded == 3
    assert len(cvat.log_where("frame")) == 3
    ids = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(task))}
    cvat.add_shapes(task, [{"type": "polygon", "frame": 5, "label_id": ids["monocyte"],
                            "points": [1.0, 1.0, 30.0, 1.0, 30.0, 30.0]}])
    cvat.reset_log()
    report = pull(cvat, task, tmp_path)
    assert report.downloaded == 0 and report.reused == 6 and report.shapes["monocyte"] == 1
    assert cvat.bytes_sent("frame") == 0


@pytest.mark.parametrize("fmt", ["COCO 1.0", "CVAT for images 1.1"])
def test_export_path_gives_the_same_training_set(cvat: StandinCVAT, task: int, tmp_path: Path, fmt: str) -> None:
    pull(cvat, task, tmp_path / "api")
    report = pull(cvat, task, tmp_path / "export", via="export", export_format=fmt)
    assert report.frames == 3
    a = load_dataset(tmp_path / "api" / f"task-{task}", label_map=None, require_images=True)
    b = load_dataset(tmp_path / "export" / f"task-{task}", label_map=None, require_images=True)
    assert [r.name for r in a.images] == [r.name for r in b.images]
    for ra, rb in zip(a.images, b.images, strict=True):
        assert Path(ra.path).read_bytes() == Path(rb.path).read_bytes()
        assert sorted((i.label, i.kind) for i in ra.instances) == sorted((i.label, i.kind) for i in rb.instances)
        for ia in ra.instances:
            ib = next(i for i in rb.instances if (i.label, i.kind) == (ia.label, ia.kind))
            if fmt.startswith("CVAT"):   # CVAT's COCO export has no shape source; its XML does
                assert ia.source == ib.source
            if ia.kind == "rectangle":
                assert np.allclose(ia.box, ib.box, atol=0.01)
            else:
                ma, mb = ia.to_mask(ra.height, ra.width), ib.to_mask(rb.height, rb.width)
                assert (ma & mb).sum() / (ma | mb).sum() > 0.99


ATTRIBUTES = {"basophil": [{"name": "stage", "input_type": "select", "values": ["early", "late"]},
                           {"name": "smudged", "input_type": "checkbox", "values": ["false", "true"]}],
              "neutrophil": [{"name": "lobes", "input_type": "number", "values": ["1", "6", "1"]}]}


@pytest.mark.parametrize("fmt", ["COCO 1.0", "CVAT for images 1.1"])
def test_api_and_export_pulls_store_attributes_under_the_same_names(cvat: StandinCVAT, tmp_path: Path,
                                                                     fmt: str) -> None:
    labels = [{**lab, "attributes": ATTRIBUTES.get(lab["name"], [])} for lab in LABELS]
    tid = cvat.add_task("attributes", frames=[(f"IMG_{i:04d}.jpg", jpeg(i)) for i in range(2)], labels=labels,
                        segment_size=2)
    by_name = {lab.name: lab for lab in cvat.task_labels(cvat.task(tid))}
    spec = {(lab.name, a["name"]): a["id"] for lab in by_name.values() for a in lab.attributes}
    disc = np.zeros((20, 24), bool)
    disc[2:18, 3:21] = True
    cvat.set_annotations(tid, [
        {"type": "polygon", "frame": 0, "label_id": by_name["basophil"].id,
         "points": [40.0, 40.0, 90.0, 45.5, 80.0, 100.25, 35.0, 90.0],
         "attributes": [{"spec_id": spec["basophil", "stage"], "value": "late"},
                        {"spec_id": spec["basophil", "smudged"], "value": "true"}]},
        {"type": "mask", "frame": 1, "label_id": by_name["neutrophil"].id, "points": mask_points(150, 60, disc),
         "attributes": [{"spec_id": spec["neutrophil", "lobes"], "value": "3"}]},
        {"type": "rectangle", "frame": 1, "label_id": by_name["lymphocyte"].id,
         "points": [200.0, 150.0, 260.5, 210.25]},
    ])
    cvat.set_job_state(jobs_of(cvat, tid)[0], state="completed")
    pull(cvat, tid, tmp_path / "api")
    pull(cvat, tid, tmp_path / "export", via="export", export_format=fmt)

    def attributes(root: Path) -> list[tuple[str, str, dict[str, str]]]:
        data = load_dataset(root / f"task-{tid}", label_map=None, require_images=True)
        return sorted((r.name, i.label, i.attributes) for r in data.images for i in r.instances)

    expected = [("IMG_0000.jpg", "basophil", {"stage": "late", "smudged": "true"}),
                ("IMG_0001.jpg", "lymphocyte", {}), ("IMG_0001.jpg", "neutrophil", {"lobes": "3"})]
    assert attributes(tmp_path / "api") == expected
    assert attributes(tmp_path / "export") == expected


def test_legacy_export_flow_when_the_server_has_no_requests_api(cvat: StandinCVAT, task: int, tmp_path: Path) -> None:
    cvat.add_fault("status", "export", method="POST", status=405)
    report = pull(cvat, task, tmp_path, via="export")
    assert report.frames == 3
    assert any("action=download" in e.query for e in cvat.log_where("download"))


def test_project_pull_and_org_scoping(cvat: StandinCVAT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cvat.add_org("lab", owner="admin")
    pid = cvat.add_project("smears", labels=LABELS, org="lab")
    t1 = make_task(cvat, name="a", project_id=pid, n_frames=2, segment=2)
    t2 = make_task(cvat, name="b", project_id=pid, n_frames=2, segment=2)
    for t in (t1, t2):
        cvat.set_job_state(jobs_of(cvat, t)[0], state="completed")
    for key, value in env_for(cvat, CVAT_ORG="lab").items():
        monkeypatch.setenv(key, value)
    assert cli(["pull", "--project", str(pid), "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / f"task-{t1}").is_dir() and (tmp_path / f"task-{t2}").is_dir()
    assert all(e.path.startswith("/api/") for e in cvat.log)
    monkeypatch.setenv("CVAT_ORG", "")
    assert cli(["pull", "--task", str(t1), "--out", str(tmp_path / "x"), "--org", "nope"]) == 4


# --- faults ---------------------------------------------------------------------------------------

def test_twenty_percent_faults_still_end_in_a_complete_verified_dataset(cvat: StandinCVAT, tmp_path: Path) -> None:
    tid = make_task(cvat, n_frames=12, segment=12)
    cvat.set_job_state(jobs_of(cvat, tid)[0], state="completed")
    for kind, extra in (("status", {"status": 500}), ("status", {"status": 502}), ("status", {"status": 503}),
                        ("throttle", {"retry_after": 0}), ("drop", {}), ("truncate", {}), ("reset", {})):
        cvat.add_fault(kind, "any", rate=0.2 / 7 * 1.0, **extra)
    report = pull(cvat, tid, tmp_path)
    assert report.frames == 12
    fired = sum(f.fired for f in cvat.faults.active())
    assert fired > 0
    prov = json.loads((tmp_path / f"task-{tid}" / "cvat_sync.json").read_text())
    for i, frame in enumerate(prov["frames"]):
        data = (tmp_path / f"task-{tid}" / "images" / frame["name"]).read_bytes()
        assert data == jpeg(i) and hashlib.sha256(data).hexdigest() == frame["sha256"]


def test_retry_after_is_honoured(cvat: StandinCVAT, task: int, tmp_path: Path) -> None:
    cvat.add_fault("throttle", "meta", times=1, retry_after=1)
    t0 = time.monotonic()
    with CvatClient(settings(cvat), retry=RetryPolicy(attempts=3, backoff=0.01, max_wait=5)) as client:
        pull_tasks(client, [task], PullOptions(out=tmp_path, progress=False))
    assert time.monotonic() - t0 >= 1.0


def test_export_that_fails_is_a_clear_error(cvat: StandinCVAT, task: int, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    cvat.add_fault("export_fail", "export", message="disk full on the export worker")
    for key, value in env_for(cvat).items():
        monkeypatch.setenv(key, value)
    assert cli(["pull", "--task", str(task), "--out", str(tmp_path), "--via", "export"]) == 6
    assert "disk full on the export worker" in caplog.text
    assert not (tmp_path / f"task-{task}").exists()


def test_server_down_after_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with StandinCVAT() as server:
        url = server.url
    for key, value in {"CVAT_URL": url, "CVAT_TOKEN": "x", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    assert cli(["pull", "--task", "1", "--out", str(tmp_path), "--retries", "2"]) == 5
    assert "is the server up" in caplog.text


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "code", "words"), [
    ({"CVAT_URL": "ftp://example.org"}, 2, "not an http"),
    ({"CVAT_URL": "example.org"}, 2, "not an http"),
    ({"CVAT_TOKEN": "wrong-token-123"}, 3, "rejected the credentials"),
    ({"CVAT_TOKEN": "", "CVAT_USERNAME": "admin", "CVAT_PASSWORD": "not-the-password"}, 3, "refused the login"),
])
def test_bad_settings_exit_with_a_clear_message(cvat: StandinCVAT, task: int, tmp_path: Path, env: dict,
                                                code: int, words: str, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in {**env_for(cvat), **env}.items():
        monkeypatch.setenv(key, value)
    assert cli(["pull", "--task", str(task), "--out", str(tmp_path)]) == code
    assert words in caplog.text
    everything = caplog.text + "".join(capsys.readouterr())
    for secret in ("wrong-token-123", "not-the-password", cvat.admin_token or "?"):
        assert secret not in everything


def test_user_and_password_log_in_for_a_token(cvat: StandinCVAT, task: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**env_for(cvat), "CVAT_TOKEN": "", "CVAT_USERNAME": "admin", "CVAT_PASSWORD": "admin"}.items():
        monkeypatch.setenv(key, value)
    assert cli(["pull", "--task", str(task), "--out", str(tmp_path)]) == 0
    assert any(e.path == "/api/auth/login" for e in cvat.log)


def test_personal_access_token_on_a_newer_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with StandinCVAT(version="2.40.0") as server:
        tid = make_task(server, n_frames=2, segment=2)
        server.set_job_state(jobs_of(server, tid)[0], state="completed")
        pat = server.add_access_token("admin")
        for key, value in {"CVAT_URL": server.url, "CVAT_ACCESS_TOKEN": pat, "HOME": str(tmp_path)}.items():
            monkeypatch.setenv(key, value)
        assert cli(["pull", "--task", str(tid), "--out", str(tmp_path / "a")]) == 0
        assert cli(["pull", "--task", str(tid), "--out", str(tmp_path / "b"), "--via", "export"]) == 0


@pytest.mark.parametrize(("case", "code", "words"), [
    ("missing task", 4, "not found"),
    ("other user's task", 3, "no permission"),
    ("no completed jobs", 6, "has no completed jobs"),
    ("strict labels", 6, "not in the trainer's label map"),
    ("not an image", 6, "not images"),
])
def test_task_problems_exit_with_a_clear_message(cvat: StandinCVAT, tmp_path: Path, case: str, code: int,
                                                 words: str, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    tid = make_task(cvat)
    env = env_for(cvat)
    args = ["pull", "--task", str(tid), "--out", str(tmp_path), "--no-progress"]
    if case == "missing task":
        args[2] = "999999"
    elif case == "other user's task":
        env["CVAT_TOKEN"] = cvat.add_user("viewer", "viewer-pass")
    elif case == "strict labels":
        cvat.set_job_state(jobs_of(cvat, tid)[0], state="completed")
        labels = tmp_path / "labels.yaml"
        labels.write_text("classes: [basophil, lymphocyte]\n")
        args += ["--labels", str(labels), "--strict-labels"]
    elif case == "not an image":
        bad = cvat.add_task("bad", frames=[("a.jpg", jpeg(1)), ("b.jpg", jpeg(2))], labels=LABELS)
        cvat.task(bad).frames[1].data = b"this is not an image at all"
        cvat.set_job_state(jobs_of(cvat, bad)[0], state="completed")
        args[2] = str(bad)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli(args) == code
    assert words in caplog.text
    assert not any(p.name.startswith("task-") for p in tmp_path.iterdir())
    if case == "not an image":
        assert cli([*args, "--skip-bad-frames"]) == 0
        prov = json.loads((tmp_path / f"task-{args[2]}" / "cvat_sync.json").read_text())
        assert [f["name"] for f in prov["frames"]] == ["a.jpg"] and prov["skipped_frames"] == {"not an image": 1}


def test_dry_run_writes_nothing(cvat: StandinCVAT, task: int, tmp_path: Path) -> None:
    report = pull(cvat, task, tmp_path, dry_run=True)
    assert report.status == "dry-run" and report.frames == 3
    assert not (tmp_path / f"task-{task}").exists() and cvat.bytes_sent("frame") == 0


def test_not_a_cvat_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import http.server
    import threading

    (tmp_path / "index.html").write_text("<html><title>My blog</title></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key, value in {"CVAT_URL": f"http://127.0.0.1:{server.server_address[1]}", "CVAT_TOKEN": "x",
                           "HOME": str(tmp_path)}.items():
            monkeypatch.setenv(key, value)
        assert cli(["pull", "--task", "1", "--out", str(tmp_path / "o")]) == 2
        assert "does not look like a CVAT server" in caplog.text
    finally:
        server.shutdown()


# --- nothing lost -----------------------------------------------------------------------------------

def test_disk_full_keeps_the_previous_dataset_and_a_rerun_finishes(cvat: StandinCVAT, task: int, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pull(cvat, task, tmp_path)
    old = (tmp_path / f"task-{task}" / "cvat_sync.json").read_text()
    cvat.set_job_state(jobs_of(cvat, task)[1], state="completed")
    real = store.atomic_write_bytes
    writes = {"n": 0}

    def full_disk(path: Path, data: bytes) -> None:
        writes["n"] += 1
        if writes["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", full_disk)
    with pytest.raises(store.StoreError, match="disk full"):
        pull(cvat, task, tmp_path, workers=1)
    assert (tmp_path / f"task-{task}" / "cvat_sync.json").read_text() == old  # previous dataset untouched
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    cvat.reset_log()
    report = pull(cvat, task, tmp_path, workers=1)
    assert report.frames == 6 and report.downloaded < 3  # frames written before the disk filled are reused


def test_a_second_pull_of_the_same_task_is_refused_while_one_runs(cvat: StandinCVAT, task: int,
                                                                  tmp_path: Path) -> None:
    with store.task_lock(tmp_path, task), pytest.raises(store.StoreError, match="another pull"):
        pull(cvat, task, tmp_path)


def test_ctrl_c_mid_pull_then_a_rerun_completes_it(cvat: StandinCVAT, tmp_path: Path) -> None:
    tid = make_task(cvat, n_frames=16, segment=16)
    cvat.set_job_state(jobs_of(cvat, tid)[0], state="completed")
    cvat.add_fault("delay", "frame", delay=0.25)
    env = {**os.environ, **env_for(cvat), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "cvat_sync", "pull", "--task", str(tid), "--out", str(tmp_path), "--workers", "2",
            "--no-progress"]
    # A test run started in the background (nohup, CI runners) has SIGINT ignored, and the child would inherit
    # that: Python then installs no KeyboardInterrupt handler. Give the child Ctrl-C back, as a terminal would.
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(cvat.log_where("frame", status=200)) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Run the same command again" in err
    assert not (tmp_path / f"task-{tid}").exists()
    cvat.clear_faults()
    cvat.reset_log()
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(cvat.log_where("frame")) < 16  # frames from the interrupted run were reused
    data = load_dataset(tmp_path / f"task-{tid}", label_map=None, require_images=True)
    assert len(data.images) == 16


def test_help_explains() -> None:
    out = subprocess.run([sys.executable, "-m", "cvat_sync", "pull", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for word in ("--task", "--project", "--jobs", "--via", "--dry-run", "exit codes", "CVAT_ACCESS_TOKEN"):
        assert word in out


def test_list_and_status(cvat: StandinCVAT, task: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in env_for(cvat).items():
        monkeypatch.setenv(key, value)
    assert cli(["list"]) == 0
    listed = capsys.readouterr().out
    assert "CVAT 2.23.1" in listed and "slides" in listed
    assert "1/2 jobs pull would take (--jobs completed: state=completed)" in listed  # what pull takes, not CVAT's
    assert cli(["list", "--jobs", "accepted"]) == 0                                # 'completed' (needs acceptance)
    assert "0/2 jobs pull would take (--jobs accepted: state=completed, stage=acceptance)" in capsys.readouterr().out
    assert cli(["status", "--out", str(tmp_path)]) == 0
    assert "no pulled tasks" in capsys.readouterr().out
    assert cli(["pull", "--task", str(task), "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    assert "3 frames (3 downloaded" in summary and "frames left out: 3 in jobs that are not completed" in summary
    assert cli(["status", "--out", str(tmp_path), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    ids = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(task))}
    cvat.add_shapes(task, [{"type": "polygon", "frame": 0, "label_id": ids["monocyte"],
                            "points": [1.0, 1.0, 30.0, 1.0, 30.0, 30.0]}])
    assert cli(["status", "--out", str(tmp_path), "--check"]) == 0
    assert "CHANGED on the server" in capsys.readouterr().out
    assert cli(["pull", "--task", str(task), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    cvat.set_job_state(jobs_of(cvat, task)[1], state="completed")  # a job change leaves the task's date alone
    assert cli(["status", "--out", str(tmp_path), "--check"]) == 0
    assert "CHANGED on the server" in capsys.readouterr().out
