"""``python -m cvat_sync`` against a hostile CVAT: the stand-in made malicious (tampered answers, odd frame names,
frames that are not images, zip bombs, impossible numbers), plus the credential and ``list`` cases.

Every case checks the exit code and the key words of the message, that nothing was written outside ``--out``
(a sentinel folder beside it stays byte-for-byte the same, with no new files), and that a refusal leaves
``--out`` as it was: absent, or the previous complete dataset, byte for byte, with no lock or staging left.

:func:`hostile_cases` lists the cases as ``(id, expected exit code)``; the ids are the pytest parameter ids
and stay stable (benchmark result files count them).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import cvat_sync.client as cvat_client
from cvat_sync.__main__ import main as cli
from tests.cvat_standin import StandinCVAT
from tests.cvat_standin.hostile import edit_meta, set_job_numbers, zip_bomb_export
from tests.standin_fixtures import small_jpeg
from wbc_core.data.loader import load_dataset
from wbc_core.labels import RVPBS_LABELS

LABELS = [{"name": n, "type": "polygon"} for n in RVPBS_LABELS]
PASSWORD = "wrong-password-xyz"
PAT = "pat-secret-0123456789"


@dataclass(frozen=True)
class Case:
    id: str
    exit_code: int
    words: tuple[str, ...] = ()   # must all appear in the log / output
    hole: int = 0                 # the item of the tester's report
    via: str = "api"
    previous: bool = False        # pull a good dataset first: the refusal must leave it untouched
    fmt: str = "COCO 1.0"         # --format, for --via export


REFUSED = (
    Case("not-an-image-export", 6, ("not images", "ok.jpg"), 6, via="export"),
    Case("zip-bomb", 6, ("compression ratio", "zip bomb", "--max-export-ratio"), 7, via="export"),
    Case("zip-bomb-lying-sizes", 6, ("export", "corrupt"), 7, via="export", previous=True),
    Case("export-over-size-cap", 6, ("--max-export-size",), 7, via="export"),
    Case("job-stop-frame-1e10", 6, ("stop_frame", "10000000000", "0..5"), 8, previous=True),
    Case("job-start-frame-negative", 6, ("start_frame", "-5", "0..5"), 8),
    Case("frame-body-huge", 6, ("frame", "more than 1 MiB"), 8),
    Case("meta-frame-count-mismatch", 6, ("frame list", "5", "6 frames"), 8),
    Case("meta-frame-size-huge", 6, ("frame 1", "1000000000x1000000000"), 8),
    Case("name-collision-api", 6, ("'a.jpg'", "'./a.jpg'", "images/a.jpg"), 9),
    Case("name-collision-export", 6, ("'a.jpg'", "'./a.jpg'", "images/a.jpg"), 9, via="export"),
    Case("nul-in-name", 6, ("control character", "\\x00"), 10),
    Case("control-char-in-name-export", 6, ("control character", "\\x1b"), 10, via="export"),
    Case("wrong-password", 3, ("refused the login",), 11),
    Case("wrong-password-keeps-previous", 3, ("refused the login",), 11, previous=True),
    Case("pat-on-a-server-without-pats", 3, ("no Personal Access Tokens", "CVAT_TOKEN", "CVAT_USERNAME"), 12),
)
CONTAINED = (
    Case("absolute-name-export", 0, (), 5, via="export"),
    Case("absolute-name-export-cvat-xml", 0, (), 5, via="export", fmt="CVAT for images 1.1"),
    Case("absolute-name-api", 0, (), 5),
)
REPULL = (
    Case("repull-odd-names-api", 0, ("unchanged",), 14),
    Case("repull-odd-names-export", 0, ("unchanged",), 14, via="export"),
    Case("repull-odd-names-export-cvat-xml", 0, ("unchanged",), 14, via="export", fmt="CVAT for images 1.1"),
)
LISTED = (
    Case("list-shows-what-pull-takes", 0, ("2/3 jobs pull would take (--jobs completed: state=completed)",), 13),
)
CASES = REFUSED + CONTAINED + REPULL + LISTED


def hostile_cases() -> list[tuple[str, int]]:
    """Every hostile case as ``(id, expected exit code)``, in a stable order (ids are the pytest param ids)."""
    return [(case.id, case.exit_code) for case in CASES]


# --- helpers ------------------------------------------------------------------------------------

def snapshot(root: Path, skip: str | None = None) -> dict[str, str]:
    """Every folder and file under ``root`` (hidden ones too; ``skip``: a top-level name to leave out): relative
    path -> ``"dir"`` or the file's sha256."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if skip and rel.parts[:1] == (skip,):
            continue
        for d in dirs:
            if not (skip and rel == Path(".") and d == skip):
                out[str(rel / d)] = "dir"
        for f in files:
            out[str(rel / f)] = hashlib.sha256((Path(folder) / f).read_bytes()).hexdigest()
    return out


def make_task(cvat: StandinCVAT, names: list[str], segment: int | None = None, complete: int = 1) -> int:
    """A task with one frame per name (frame i is small_jpeg(i)), a polygon on every frame, and its first
    ``complete`` jobs completed."""
    tid = cvat.add_task("hostile", frames=[(n, small_jpeg(i)) for i, n in enumerate(names)], labels=LABELS,
                        segment_size=segment)
    label = cvat.task_labels(cvat.task(tid))[1].id
    cvat.set_annotations(tid, [{"type": "polygon", "frame": f, "label_id": label,
                                "points": [40.0 + f, 40.0, 90.0, 45.5, 80.0, 100.25, 35.0, 90.0]}
                               for f in range(len(names))])
    for job in sorted(cvat.task(tid).jobs)[:complete]:
        cvat.set_job_state(job, state="completed")
    return tid


def env_for(cvat: StandinCVAT, home: Path) -> dict[str, str]:
    return {"CVAT_URL": cvat.url, "CVAT_TOKEN": cvat.admin_token or "", "CVAT_ACCESS_TOKEN": "", "CVAT_USERNAME": "",
            "CVAT_PASSWORD": "", "CVAT_ORG": "", "CVAT_SYNC_CONFIG": "", "HOME": str(home)}


def run(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cli(args)


def pull_args(tid: int, out: Path, via: str = "api", *extra: str, fmt: str = "COCO 1.0") -> list[str]:
    return ["pull", "--task", str(tid), "--out", str(out), "--via", via, "--format", fmt, "--no-progress", *extra]


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@pytest.fixture(autouse=True)
def memory_cap() -> Iterator[None]:
    """A hostile answer must never make a pull eat the machine's memory (a job with ``stop_frame`` 1e10 once
    did). Cap the address space at what the test process uses now + 2 GiB, so a regression is a MemoryError
    in this test, not the OOM killer picking a process."""
    used = _address_space()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if used is None:
        yield
        return
    cap = used + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def cvat() -> Any:
    with StandinCVAT(seed=1, export_polls=0) as server:
        yield server


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    """``out`` (not created), ``outside`` (a sentinel folder beside it) and ``home`` (an empty HOME)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel.jpg").write_bytes(small_jpeg(99))  # a real image the server never sends
    (outside / "notes.txt").write_text("not for the dataset\n")
    (tmp_path / "home").mkdir()
    return {"root": tmp_path, "out": tmp_path / "out", "outside": outside, "home": tmp_path / "home"}


# --- refusals -----------------------------------------------------------------------------------

def _nothing() -> None:
    return None


def _setup(case: Case, cvat: StandinCVAT, place: dict[str, Path], env: dict[str, str]
           ) -> tuple[int, list[str], Callable[[], None]]:
    """The task, extra CLI arguments, and what makes the server (or the credentials) hostile."""
    names = [f"IMG_{i:04d}.jpg" for i in range(6)]
    extra: list[str] = []
    hostile: Callable[[], None] = _nothing
    cid = case.id
    if cid == "not-an-image-export":
        tid = make_task(cvat, ["ok.jpg", "b.jpg"])

        def text_frame() -> None:
            cvat.set_frame_data(tid, 0, b"this is a text file, not a JPEG\n" * 10)
        hostile = text_frame
    elif cid in ("zip-bomb", "zip-bomb-lying-sizes"):
        tid = make_task(cvat, names[:2])
        declared = 1000 if cid == "zip-bomb-lying-sizes" else None

        def bomb() -> None:  # 3 GiB of zeros in ~3 MB, as IMG_0001.jpg's member
            cvat.add_fault("tamper", "download", transform=zip_bomb_export("IMG_0001.jpg", 3 << 30, declared))
        hostile = bomb
    elif cid == "export-over-size-cap":
        tid = make_task(cvat, names[:2])
        extra = ["--max-export-size", "1K"]
    elif cid.startswith("job-"):
        tid = make_task(cvat, names, segment=3, complete=2)
        job = sorted(cvat.task(tid).jobs)[1]
        values = {"stop_frame": 1e10} if cid == "job-stop-frame-1e10" else {"start_frame": -5}

        def bad_job() -> None:
            cvat.add_fault("tamper", ("list", "detail"), path_contains="/api/jobs",
                           transform=set_job_numbers(job, **values))
        hostile = bad_job
    elif cid == "frame-body-huge":  # frames over the (lowered) cap: refused while they arrive, never held
        tid = make_task(cvat, names)

        def big_frames() -> None:
            cvat.add_fault("tamper", "frame", transform=lambda body: body + b"\0" * (2 << 20))
        hostile = big_frames
    elif cid.startswith("meta-"):
        tid = make_task(cvat, names)
        if cid == "meta-frame-count-mismatch":
            def edit(meta: dict) -> None:
                meta["frames"].pop()
        else:
            def edit(meta: dict) -> None:
                meta["frames"][1].update(width=10**9, height=10**9)

        def bad_meta() -> None:
            cvat.add_fault("tamper", "meta", transform=edit_meta(edit))
        hostile = bad_meta
    elif cid.startswith("name-collision"):
        tid = make_task(cvat, ["a.jpg", "./a.jpg"])
    elif cid == "nul-in-name":
        tid = make_task(cvat, ["ok.jpg", "bad\x00name.jpg"])
    elif cid == "control-char-in-name-export":
        tid = make_task(cvat, ["ok.jpg", "evil\x1b[2J.jpg"])
    elif cid.startswith("wrong-password"):
        tid = make_task(cvat, names[:2])

        def wrong_password() -> None:
            env.update(CVAT_TOKEN="", CVAT_USERNAME="admin", CVAT_PASSWORD=PASSWORD)
        hostile = wrong_password
    elif cid == "pat-on-a-server-without-pats":
        tid = make_task(cvat, names[:2])

        def personal_access_token() -> None:
            env.update(CVAT_TOKEN="", CVAT_ACCESS_TOKEN=PAT)
        hostile = personal_access_token
    else:
        raise AssertionError(f"no setup for {cid}")
    return tid, extra, hostile


@pytest.mark.parametrize("case", REFUSED, ids=[c.id for c in REFUSED])
def test_hostile_server_is_refused_and_nothing_is_written(case: Case, cvat: StandinCVAT, place: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    env = env_for(cvat, place["home"])
    monkeypatch.setattr(cvat_client, "MAX_FRAME_BYTES", 1 << 20)  # 512 MiB in use; 1 MiB keeps the test small
    tid, extra, hostile = _setup(case, cvat, place, env)
    args = pull_args(tid, place["out"], case.via, *extra, fmt=case.fmt)
    if case.previous:
        assert run(args, env, monkeypatch) == 0
        assert (place["out"] / f"task-{tid}" / "cvat_sync.json").is_file()
        assert not list(place["out"].glob(".*"))  # no lock, staging or export left by a pull that worked
        cvat.set_task_name(tid, "changed since the last pull")  # so the next pull is not "unchanged"
    hostile()
    before = snapshot(place["root"])
    caplog.clear()
    capsys.readouterr()
    code = run(args, env, monkeypatch)
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert code == case.exit_code, text
    for word in case.words:
        assert word in text, f"{word!r} not in: {text}"
    if case.id.startswith("job-"):
        job = sorted(cvat.task(tid).jobs)[1]
        assert f"job {job}" in text
    assert "Traceback" not in text
    # nothing written anywhere: --out as before (absent, or the previous dataset byte for byte; no lock, no
    # staging, no export leftovers), the sentinel folder beside it untouched, no new files
    assert snapshot(place["root"]) == before
    if not case.previous:
        assert not place["out"].exists()
    for secret in (cvat.admin_token or "?", PASSWORD, PAT):
        assert secret not in text


# --- absolute frame names: the dataset references only files inside it ------------------------------

@pytest.mark.parametrize("case", CONTAINED, ids=[c.id for c in CONTAINED])
def test_absolute_frame_names_stay_inside_the_dataset(case: Case, cvat: StandinCVAT, place: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = place["outside"] / "sentinel.jpg"
    names = [str(sentinel), "IMG_0001.jpg"]
    tid = make_task(cvat, names)
    outside_before = snapshot(place["root"], skip="out")
    assert run(pull_args(tid, place["out"], case.via, fmt=case.fmt), env_for(cvat, place["home"]), monkeypatch) == 0
    folder = place["out"] / f"task-{tid}"
    coco = json.loads((folder / "annotations" / "instances_default.json").read_text())
    for image in coco["images"]:
        name = image["file_name"]
        assert not name.startswith("/") and ".." not in Path(name).parts and "\\" not in name
        assert (folder / "images" / name).resolve().is_relative_to(folder.resolve())
    data = load_dataset(folder, label_map=None, require_images=True)
    assert len(data.images) == 2
    for index, record in enumerate(data.images):  # what the trainer reads: inside, and the server's pixels
        assert Path(record.path).resolve().is_relative_to(folder.resolve())
        assert Path(record.path).read_bytes() == small_jpeg(index)
    assert sentinel.read_bytes() == small_jpeg(99)
    assert snapshot(place["root"], skip="out") == outside_before  # nothing written or changed beside --out
    prov = json.loads((folder / "cvat_sync.json").read_text())
    assert prov["frames"][0]["cvat_name"] == str(sentinel)
    assert prov["frames"][0]["name"] == str(sentinel).lstrip("/")


# --- an unchanged task is not pulled again, whatever its frame names ---------------------------------

@pytest.mark.parametrize("case", REPULL, ids=[c.id for c in REPULL])
def test_unchanged_repull_of_odd_names_moves_no_image_bytes(case: Case, cvat: StandinCVAT, place: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    names = [str(place["outside"] / "sentinel.jpg"), "./dot.jpg", "nested/dir/deep.jpg", "ünïcødé-🩸 ß.jpg",
             "with space.jpg", "IMG_0001.jpg"]
    tid = make_task(cvat, names)
    env = env_for(cvat, place["home"])
    args = pull_args(tid, place["out"], case.via, fmt=case.fmt)
    assert run(args, env, monkeypatch) == 0
    first = snapshot(place["out"])
    capsys.readouterr()
    cvat.reset_log()
    assert run(args, env, monkeypatch) == 0
    out = capsys.readouterr().out
    for word in case.words:
        assert word in out
    assert len(cvat.log) <= 5, [(e.method, e.path) for e in cvat.log]
    assert cvat.bytes_sent("frame") == 0 and cvat.bytes_sent("download") == 0
    assert snapshot(place["out"]) == first  # nothing rewritten
    data = load_dataset(place["out"] / f"task-{tid}", label_map=None, require_images=True)
    assert len(data.images) == len(names)


# --- list says what pull will take ----------------------------------------------------------------

@pytest.mark.parametrize("case", LISTED, ids=[c.id for c in LISTED])
def test_list_shows_the_jobs_pull_would_take(case: Case, cvat: StandinCVAT, place: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    tid = make_task(cvat, [f"IMG_{i:04d}.jpg" for i in range(6)], segment=2, complete=2)  # 2 of 3 jobs completed
    env = env_for(cvat, place["home"])
    task_json = requests.get(f"{cvat.url}/api/tasks/{tid}", headers={"Authorization": f"Token {cvat.admin_token}"},
                             timeout=10).json()
    assert task_json["jobs"] == {**task_json["jobs"], "count": 3, "completed": 0}  # CVAT: completed *and* accepted
    assert run(["list"], env, monkeypatch) == case.exit_code
    listed = capsys.readouterr().out
    for word in case.words:
        assert word in listed
    assert run(["list", "--jobs", "accepted"], env, monkeypatch) == 0
    assert "0/3 jobs pull would take (--jobs accepted: state=completed, stage=acceptance)" in capsys.readouterr().out
    assert run(["list", "--jobs", "all"], env, monkeypatch) == 0
    assert "3/3 jobs pull would take (--jobs all" in capsys.readouterr().out
    assert run(pull_args(tid, place["out"]), env, monkeypatch) == 0
    assert "jobs: 2 of 3 admitted" in capsys.readouterr().out


def test_every_case_is_tested_once() -> None:
    ids = [case_id for case_id, _ in hostile_cases()]
    assert len(ids) == len(set(ids)) == 23
    assert all(code in (0, 3, 6) for _, code in hostile_cases())
