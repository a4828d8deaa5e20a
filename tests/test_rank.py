"""``python -m cvat_sync rank``: ranking a CVAT task's unannotated frames and queueing the top ones in a new task,
over real HTTP against the CVAT stand-in, with a real (tiny) bundle through the real ``detect``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cvat_sync.__main__ import main as cvat_sync_main
from cvat_sync.client import CvatClient, CvatError, RetryPolicy
from cvat_sync.config import Secret, Settings
from cvat_sync.rank import (
    QUEUED_JSON,
    RANKING_CSV,
    RANKING_JSON,
    RankedFrame,
    RankError,
    RankOptions,
    annotated_frames,
    frames_to_queue,
    rank_task,
)
from tests.cvat_standin import StandinCVAT
from tests.standin_fixtures import small_jpeg
from tests.tiny_models import blob_segmenter
from wbc_core.bundle import write_bundle
from wbc_core.detect import Predictor
from wbc_core.split import split_side
from wbc_core.uncertainty import FrameUncertainty

FRAMES = [(f"slide_{i}.jpg", small_jpeg(i, 256, 192)) for i in range(5)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    cfg, model = blob_segmenter(1)
    return write_bundle(tmp_path_factory.mktemp("rank") / "bundle", model, ["wbc"], cfg, 0.02)


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return Predictor(bundle, device="cpu")


def _client(cvat: StandinCVAT, attempts: int = 2) -> CvatClient:
    return CvatClient(Settings(url=cvat.url, token=Secret(cvat.admin_token)),
                      retry=RetryPolicy(attempts=attempts, read_timeout=10, backoff=0.01))


def _task(cvat: StandinCVAT, labels: list[str] | None = None, frames: list | None = None) -> int:
    tid = cvat.add_task("smears", frames=FRAMES if frames is None else frames,
                        labels=[{"name": n, "type": "any"} for n in labels or ["wbc", "rbc"]])
    return tid


def test_rank_skips_annotated_frames_queues_the_top_ones_and_then_says_nothing_is_left(
        tmp_path: Path, predictor: Predictor) -> None:
    with StandinCVAT() as cvat, _client(cvat) as client:
        tid = _task(cvat)
        label = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(tid))}["wbc"]
        cvat.set_annotations(tid, [{"type": "rectangle", "frame": 1, "label_id": label, "points": [1, 1, 20, 20]}])
        out = tmp_path / "rank"
        top2 = RankOptions(out=out, create_task=2, progress=False, val_fraction=0.0)
        first = rank_task(client, tid, predictor, top2)
        ranked = [r["frame"] for r in first["ranking"]]
        assert sorted(ranked) == [0, 2, 3, 4] and first["frames_annotated"] == 1
        scores = [r["score"] for r in first["ranking"]]
        assert scores == sorted(scores, reverse=True) and [r["rank"] for r in first["ranking"]] == [1, 2, 3, 4]
        # score = uncertainty x typicality ** density_power, each part written down
        power = first["density_power"]
        assert power > 0 and all(0 < r["typicality"] <= 1 for r in first["ranking"])
        assert all(r["score"] == pytest.approx(r["uncertainty"] * r["typicality"] ** power, abs=2e-4)
                   for r in first["ranking"])
        assert json.loads((out / RANKING_JSON).read_text()) == first
        assert len((out / RANKING_CSV).read_text().splitlines()) == 1 + 4

        created = first["created_task"]  # the top 2 (val_fraction 0: whatever their retrain side)
        new = cvat.task(created["id"])
        assert [f.name for f in new.frames] == [FRAMES[n][0] for n in ranked[:2]] == created["frames"]
        assert [f.data for f in new.frames] == [FRAMES[n][1] for n in ranked[:2]]  # the original bytes
        assert [lab.name for lab in cvat.task_labels(new)] == ["wbc", "rbc"]
        assert json.loads((out / QUEUED_JSON).read_text()) == {str(tid): [{"task": created["id"],
                                                                          "frames": created["frames"]}]}

        second = rank_task(client, tid, predictor, top2)
        assert sorted(r["frame"] for r in second["ranking"]) == sorted(ranked[2:])
        tasks_before = len(cvat.tasks)
        with pytest.raises(RankError, match="every frame is already annotated or queued"):
            rank_task(client, tid, predictor, top2)
        assert json.loads((out / RANKING_JSON).read_text()) == second and len(cvat.tasks) == tasks_before


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path, predictor: Predictor) -> None:
    out = tmp_path / "rank"
    with StandinCVAT() as cvat, _client(cvat) as client:
        empty = _task(cvat, frames=[])
        with pytest.raises(RankError, match="has no frames"):
            rank_task(client, empty, predictor, RankOptions(out=out, progress=False))
        other = _task(cvat, labels=["neutrophil", "lymphocyte"])
        with pytest.raises(RankError, match=r"none of the bundle's \(wbc\)"):
            rank_task(client, other, predictor, RankOptions(out=out, create_task=2, progress=False))
        done = _task(cvat)
        label = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(done))}["wbc"]
        cvat.set_annotations(done, [{"type": "rectangle", "frame": f, "label_id": label, "points": [1, 1, 9, 9]}
                                    for f in range(len(FRAMES))])
        with pytest.raises(RankError, match="already annotated"):
            rank_task(client, done, predictor, RankOptions(out=out, progress=False))
        assert len(cvat.tasks) == 3
    assert not out.exists()


def test_a_server_that_goes_away_or_a_failed_upload_leaves_nothing(tmp_path: Path, predictor: Predictor) -> None:
    out = tmp_path / "rank"
    with StandinCVAT() as cvat, _client(cvat) as client:
        tid = _task(cvat)
        fault = cvat.add_fault("reset", "frame", times=None)
        with pytest.raises(CvatError, match="failed 2 times"):
            rank_task(client, tid, predictor, RankOptions(out=out, create_task=2, progress=False))
        cvat.remove_fault(fault)
        assert not out.exists() and len(cvat.tasks) == 1

        cvat.add_fault("export_fail", "create", message="the uploaded files are broken")
        with pytest.raises(CvatError, match="broken"):
            rank_task(client, tid, predictor, RankOptions(out=out, create_task=2, progress=False))
        assert len(cvat.tasks) == 1, "the half-made task must be deleted"
        assert not out.exists()


def test_unreadable_frames_rank_last_and_colliding_names_create_no_task(tmp_path: Path, predictor: Predictor) -> None:
    with StandinCVAT() as cvat, _client(cvat) as client:
        tid = _task(cvat)
        cvat.set_frame_data(tid, 2, b"not an image")
        record = rank_task(client, tid, predictor, RankOptions(out=tmp_path / "a", progress=False))
        assert record["ranking"][-1]["frame"] == 2 and record["ranking"][-1]["score"] is None
        assert all(r["score"] is not None for r in record["ranking"][:-1])
        # CVAT keeps only the part of a name after its last '/': two frames would become one file
        clash = _task(cvat, frames=[("left/x.jpg", FRAMES[0][1]), ("right/x.jpg", FRAMES[1][1])])
        out = tmp_path / "b"
        with pytest.raises(RankError, match=r"several named x\.jpg"):
            rank_task(client, clash, predictor, RankOptions(out=out, create_task=2, progress=False))
        assert len(cvat.tasks) == 2 and not out.exists()


def _ranked(sides: str) -> list[RankedFrame]:
    """Frames best first, one per letter: v a validation-side frame, t a training-side one, x unreadable."""
    return [RankedFrame(i, f"f{i}.jpg", float("-inf") if c == "x" else float(len(sides) - i), FrameUncertainty(),
                        split=None if c == "x" else "val" if c == "v" else "train") for i, c in enumerate(sides)]


def test_a_queue_holds_validation_frames_spread_over_the_ranking() -> None:
    ranked = _ranked("vtttxvttttvttttvtttt")
    # 10 frames at a fifth for validation: two validation-side frames from the middle of their ranking (the 2nd
    # and 4th of 0, 5, 10, 15), eight top training-side frames; the unreadable frame never
    assert [r.frame for r in frames_to_queue(ranked, 10, 0.2)] == [1, 2, 3, 5, 6, 7, 8, 9, 11, 15]
    assert [r.frame for r in frames_to_queue(ranked, 10, 0.0)] == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]  # the top 10
    # too few training-side frames: validation-side ones fill the queue; too few frames: all of them
    assert [r.split for r in frames_to_queue(_ranked("ttvvvv"), 5, 0.2)] == ["train", "train", "val", "val", "val"]
    assert len(frames_to_queue(_ranked("tvx"), 5, 0.2)) == 2
    assert [r.frame for r in frames_to_queue(_ranked("tttt"), 3, 0.2)] == [0, 1, 2]  # no validation frame to give


def test_the_ranking_knows_each_frames_retrain_side_and_queues_one_of_the_validation_side(
        tmp_path: Path, predictor: Predictor) -> None:
    with StandinCVAT() as cvat, _client(cvat) as client:
        tid = _task(cvat)
        record = rank_task(client, tid, predictor, RankOptions(out=tmp_path / "rank", create_task=2, progress=False))
        # the side trainer retrain will give each frame once pulled: the same rule over the same bytes
        truth = {name: split_side(hashlib.sha256(data).hexdigest()) for name, data in FRAMES}
        assert {r["name"]: r["split"] for r in record["ranking"]} == truth
        assert record["split"] == {"val_fraction": 0.2, "salt": "wbc-split-1"}
        assert "val" in truth.values()  # (the fixture's frames hold one)
        created = record["created_task"]
        assert created["validation_frames"] == 1 == sum(truth[n] == "val" for n in created["frames"])
        assert created["frames"][0] == record["ranking"][0]["name"] or truth[record["ranking"][0]["name"]] == "val"
        with pytest.raises(ValueError, match="val_fraction"):
            RankOptions(out=tmp_path, val_fraction=1.0)


def test_a_queue_without_any_validation_side_frame_is_said_so(tmp_path: Path, predictor: Predictor,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with StandinCVAT() as cvat, _client(cvat) as client:
        tid = _task(cvat)
        # at a 1% validation share none of the five frames is on the validation side
        record = rank_task(client, tid, predictor, RankOptions(out=tmp_path / "rank", create_task=2, progress=False,
                                                               val_fraction=0.01))
        assert {r["split"] for r in record["ranking"]} == {"train"}
        assert record["created_task"]["validation_frames"] == 0 and len(record["created_task"]["frames"]) == 2
        assert "trainer retrain will refuse to gate until a validation frame is corrected" in caplog.text


def test_annotated_frames_reads_shapes_tags_and_tracks() -> None:
    annotations = {"shapes": [{"frame": 2}], "tags": [{"frame": 5}],
                   "tracks": [{"shapes": [{"frame": 7, "outside": False}, {"frame": 9, "outside": True}]}]}
    assert annotated_frames(annotations) == {2, 5, 7}
    assert annotated_frames(None) == set() and annotated_frames({"shapes": [{"frame": "x"}]}) == set()


def test_the_command_line(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with StandinCVAT() as cvat:
        tid = _task(cvat)
        monkeypatch.setenv("CVAT_URL", cvat.url)
        monkeypatch.setenv("CVAT_TOKEN", cvat.admin_token)
        for key in ("CVAT_ACCESS_TOKEN", "CVAT_USERNAME", "CVAT_PASSWORD", "CVAT_ORG", "CVAT_SYNC_CONFIG"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        out = tmp_path / "ranked"
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--out", str(out),
                               "--create-task", "3", "--no-progress", "--weight", "low_score=2"]) == 0
        text = capsys.readouterr().out
        assert "5 frames ranked" in text and "created task" in text and cvat.admin_token not in text
        assert "(uncertainty x typicality ** 2)" in text and "of them validation-side" in text
        record = json.loads((out / RANKING_JSON).read_text())
        assert record["weights"]["low_score"] == 2.0 and len(record["created_task"]["frames"]) == 3
        assert record["density_power"] > 0 and "typicality" in text
        out0 = tmp_path / "uncertainty-only"
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--out", str(out0),
                               "--density-power", "0", "--no-progress"]) == 0
        only = json.loads((out0 / RANKING_JSON).read_text())
        assert only["density_power"] == 0 and all(r["score"] == r["uncertainty"] for r in only["ranking"])
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--density-power", "-1"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--weight", "nope=1"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--weight", "low_score=x"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--create-task", "-1"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--threshold", "1.5"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(bundle), "--val-fraction", "1"]) == 2
        assert cvat_sync_main(["rank", "--task", str(tid), "--bundle", str(tmp_path / "missing")]) == 2
        assert cvat_sync_main(["rank", "--task", "999", "--bundle", str(bundle), "--out", str(tmp_path / "x")]) == 4
        assert not (tmp_path / "x").exists()
