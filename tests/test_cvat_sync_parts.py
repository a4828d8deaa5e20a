"""cvat_sync's pure parts against the real CVAT 2.23.1 captures: settings, error bodies, shape conversion."""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from cvat_sync.client import error_detail
from cvat_sync.config import ConfigError, Secret, check_url, load_settings, parse_ratio, parse_size
from cvat_sync.convert import convert_annotations, label_attribute_names, shape_to_instance
from cvat_sync.export import ExportRefused, ExportZip
from cvat_sync.store import StoreError, UnsafeFrameName, frame_file_name, safe_relpath, task_lock
from tests.cvat_standin.hostile import RawMember, deflate_zeros, write_zip
from wbc_core.data.loader import load_dataset

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "cvat-2.23.1-captures"
needs_captures = pytest.mark.skipif(not CAPTURES.is_dir(), reason="../shared/reference is not beside the repo")


def capture(name: str) -> dict:
    return json.loads((CAPTURES / f"{name}.json").read_text())


def fake_response(status: int, body: object, content_type: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers["Content-Type"] = content_type
    resp._content = (json.dumps(body) if "json" in content_type else str(body)).encode()
    return resp


# --- settings -------------------------------------------------------------------------------------

def test_url_must_be_http_without_credentials() -> None:
    assert check_url("https://cvat.example.org/") == "https://cvat.example.org"
    assert check_url("http://127.0.0.1:8080/api") == "http://127.0.0.1:8080"
    for bad in ("cvat.example.org", "ftp://cvat.example.org", "https://", ""):
        with pytest.raises(ConfigError, match="not an http"):
            check_url(bad)
    with pytest.raises(ConfigError, match="must not contain credentials") as info:
        check_url("https://admin:hunter2@cvat.example.org")
    assert "hunter2" not in str(info.value)


def test_secrets_never_show_themselves() -> None:
    secret = Secret("hunter2-token")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    assert secret.reveal() == "hunter2-token"


def test_settings_from_env_and_a_private_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("url: https://file.example\ntoken: file-token\nout: somewhere\njobs: accepted\n")
    os.chmod(cfg, 0o600)
    s = load_settings(cfg, env={"CVAT_URL": "https://env.example", "CVAT_PASSWORD": "pw", "CVAT_USERNAME": "ann"})
    assert s.url == "https://env.example"             # the environment wins
    assert s.token is not None and s.token.reveal() == "file-token"
    assert s.out == Path("somewhere") and s.jobs == "accepted"
    assert "pw" not in repr(s) and "file-token" not in repr(s)
    os.chmod(cfg, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(None, env={"CVAT_SYNC_CONFIG": str(tmp_path / "no.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("url: [unclosed\npassword: hunter2\n")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_settings(bad, env={})
    assert "hunter2" not in str(info.value)


def test_missing_url_says_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="set CVAT_URL"):
        load_settings(None, env={})


# --- error bodies -----------------------------------------------------------------------------------

@needs_captures
@pytest.mark.parametrize(("name", "expected"), [
    ("53-error-404-task-not-found", "No Task matches the given query."),
    ("54-error-401-wrong-token", "Invalid token."),
    ("59-error-400-export-bogus-format", "Unknown format specified for the request"),
    ("33-export-coco-post-again-while-running", "Export request is being processed"),
    ("60-error-406-accept-application-json", "Could not satisfy the request Accept header."),
])
def test_error_detail_reads_every_cvat_error_shape(name: str, expected: str) -> None:
    c = capture(name)["response"]
    resp = fake_response(c["status"], c["body"], c["headers"]["content-type"])
    assert error_detail(resp) == expected


@needs_captures
def test_error_detail_of_plain_text_and_html_pages() -> None:
    c = capture("37-export-coco-download-again")["response"]
    text = c.get("body_text") or c["body_binary"].get("text_excerpt", "")
    resp = fake_response(c["status"], text, c["headers"]["content-type"])
    assert "Unknown export request id" in error_detail(resp)
    html = fake_response(404, "<html><head><title>Page not found at /api/tasks/</title></head><body>x</body></html>",
                         "text/html")
    assert error_detail(html) == "Page not found at /api/tasks/"


# --- shapes ------------------------------------------------------------------------------------------

@needs_captures
def test_captured_annotations_convert_like_cvats_own_export() -> None:
    """Shapes from GET /api/tasks/18/annotations equal what CVAT's COCO export of that task holds."""
    labels = {int(lab["id"]): lab["name"] for lab in capture("21-labels-list-task")["response"]["body"]["results"]}
    annotations = capture("27-tasks-annotations-get")["response"]["body"]
    meta = capture("20-tasks-data-meta")["response"]["body"]
    converted = convert_annotations(annotations, labels)
    assert sum(len(v) for v in converted.frames.values()) == 6 and not converted.skipped
    export = load_dataset(CAPTURES / "task-export-coco-1.0-with-images.zip", label_map=None)
    by_name = {rec.name: rec for rec in export.images}
    for number, instances in converted.frames.items():
        frame = meta["frames"][number]
        theirs = by_name[frame["name"]].instances
        assert sorted(i.label for i in instances) == sorted(i.label for i in theirs)
        for ours in instances:
            twin = next(t for t in theirs if t.label == ours.label and t.kind == ours.kind
                        and np.allclose(t.box, ours.box, atol=1.01))
            if ours.kind != "rectangle":
                a = ours.to_mask(frame["height"], frame["width"])
                b = twin.to_mask(frame["height"], frame["width"])
                assert (a & b).sum() / (a | b).sum() > 0.97


def test_frames_filter_and_skipped_reasons() -> None:
    annotations = {"shapes": [
        {"id": 1, "type": "polygon", "frame": 0, "label_id": 5, "points": [0, 0, 10, 0, 10, 10]},
        {"id": 2, "type": "points", "frame": 0, "label_id": 5, "points": [1, 1]},
        {"id": 3, "type": "polygon", "frame": 1, "label_id": 5, "points": [0, 0, 10, 0, 10, 10]},
        {"id": 4, "type": "polygon", "frame": 0, "label_id": 99, "points": [0, 0, 10, 0, 10, 10]},
        {"id": 5, "type": "mask", "frame": 0, "label_id": 5, "points": [3, 4, 0, 0, 2]},  # box too small for runs
    ], "tracks": [{"id": 9}]}
    converted = convert_annotations(annotations, {5: "basophil"}, frames={0})
    assert list(converted.frames) == [0] and len(converted.frames[0]) == 1
    assert converted.skipped == {"points shapes (no cell outline)": 1, "label id 99 not in the task's labels": 1,
                                 "shapes with broken geometry": 1, "tracks (video annotation)": 1}


def test_attributes_are_stored_by_name_and_undeclared_ids_are_kept_and_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    labels = [{"id": 5, "name": "basophil", "attributes": [{"id": 50, "name": "stage", "input_type": "select"},
                                                           {"id": 51, "name": "smudged", "input_type": "checkbox"}]},
              {"id": 6, "name": "monocyte", "attributes": []}]
    names = label_attribute_names(labels)
    assert names == {50: "stage", 51: "smudged"}
    polygon = [0, 0, 10, 0, 10, 10]
    annotations = {"shapes": [
        {"id": 1, "type": "polygon", "frame": 0, "label_id": 5, "points": polygon,
         "attributes": [{"spec_id": 50, "value": "late"}, {"spec_id": 51, "value": "true"}]},
        {"id": 2, "type": "polygon", "frame": 0, "label_id": 5, "points": polygon,
         "attributes": [{"spec_id": 50, "value": "early"}, {"spec_id": 77, "value": "x"}]},
        {"id": 3, "type": "polygon", "frame": 0, "label_id": 6, "points": polygon,
         "attributes": [{"spec_id": 77, "value": "y"}]},
    ]}
    with caplog.at_level("WARNING", logger="cvat_sync.convert"):
        converted = convert_annotations(annotations, {5: "basophil", 6: "monocyte"}, attribute_names=names)
    first, second, third = converted.frames[0]
    assert first.attributes == {"stage": "late", "smudged": "true"}
    assert second.attributes == {"stage": "early", "attribute 77": "x"}  # never dropped
    assert third.attributes == {"attribute 77": "y"}
    assert converted.unknown_attributes == {77: 2}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "77" in warnings[0].getMessage()  # once, not once per shape


def test_mask_shape_uses_the_inclusive_box() -> None:
    # a 3x2 box (left 10, top 20, right 12, bottom 21) with runs: 1 background, 4 foreground, 1 background
    inst = shape_to_instance({"type": "mask", "frame": 0, "points": [1.0, 4.0, 1.0, 10.0, 20.0, 12.0, 21.0]},
                             "neutrophil")
    assert inst.mask_origin == (10, 20)
    assert inst.mask_crop.tolist() == [[False, True, True], [True, True, False]]


def test_frame_names_cannot_escape_the_images_folder() -> None:
    assert safe_relpath("sub/IMG_1.jpg") == Path("sub/IMG_1.jpg")
    assert safe_relpath("/abs/IMG_1.jpg") == Path("abs/IMG_1.jpg")
    for bad in ("../x.jpg", "a/../../x.jpg", ""):
        with pytest.raises(StoreError):
            safe_relpath(bad)


@pytest.mark.parametrize(("name", "expected"), [
    ("IMG_1.jpg", "IMG_1.jpg"), ("/abs/dir/IMG_1.jpg", "abs/dir/IMG_1.jpg"), ("./a.jpg", "a.jpg"),
    ("a//b/./c.jpg", "a/b/c.jpg"), ("win\\path\\x.png", "win/path/x.png"), ("ünïcødé 🩸.jpg", "ünïcødé 🩸.jpg"),
    ("with space.jpg", "with space.jpg"), ("C:\\slides\\x.tif", "C:/slides/x.tif"),
])
def test_frame_file_names_are_normalised_relative_paths(name: str, expected: str) -> None:
    assert frame_file_name(name) == expected
    assert not Path(frame_file_name(name)).is_absolute()


@pytest.mark.parametrize(("name", "why"), [
    ("a\x00b.jpg", "control character"), ("a\nb.jpg", "control character"), ("\x1b[2Jx.jpg", "control character"),
    ("\ud800.jpg", "control character"), ("../x.jpg", "'..'"), ("a/../../x.jpg", "'..'"), ("", "no file name"),
    ("/", "no file name"), ("./", "no file name"), ("x" * 300 + ".jpg", "too long"), (None, "not a string"),
])
def test_frame_names_that_cannot_be_files_are_refused(name: object, why: str) -> None:
    with pytest.raises(UnsafeFrameName, match=why):
        frame_file_name(name)


# --- export zips, read defensively ----------------------------------------------------------------------

def test_export_zip_limits_come_from_the_declared_sizes(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    path.write_bytes(write_zip([RawMember("images/default/a.jpg", deflate_zeros(256 << 20), zipfile.ZIP_DEFLATED,
                                          crc=0, file_size=256 << 20)]))
    with pytest.raises(ExportRefused, match=r"compression ratio \d+:1, above --max-export-ratio 200"):
        ExportZip(path, 1, max_bytes=8 << 30, max_ratio=200)
    with pytest.raises(ExportRefused, match="more than --max-export-size"):
        ExportZip(path, 1, max_bytes=100 << 20, max_ratio=10_000)
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ExportRefused, match="not a valid zip"):
        ExportZip(tmp_path / "junk.zip", 1, max_bytes=8 << 30, max_ratio=200)


def test_export_zip_never_inflates_more_than_a_member_declares(tmp_path: Path) -> None:
    # 64 MiB of zeros declared as 1000 bytes, with the CRC of those 1000 bytes: at most 1000 bytes come out
    lying = RawMember("images/default/a.jpg", deflate_zeros(64 << 20), zipfile.ZIP_DEFLATED,
                      crc=zlib.crc32(b"\0" * 1000), file_size=1000)
    bad_crc = RawMember("images/default/b.jpg", deflate_zeros(1 << 20), zipfile.ZIP_DEFLATED, crc=1,
                        file_size=1 << 20)
    path = tmp_path / "lying.zip"
    path.write_bytes(write_zip([lying, bad_crc, RawMember("annotations/instances_default.json", b"{}")]))
    with ExportZip(path, 1, max_bytes=8 << 30, max_ratio=200) as ez:
        members = ez.image_members("COCO 1.0")
        assert sorted(members) == ["a.jpg", "b.jpg"]
        assert [n for _, n in ez.annotation_members("COCO 1.0")] == ["instances_default.json"]
        out = ez.extract(members["a.jpg"][0], tmp_path / "a.bin")
        assert out.stat().st_size == 1000
        with pytest.raises(ExportRefused, match="corrupt"):
            ez.extract(members["b.jpg"][0], tmp_path / "b.bin")
        assert not (tmp_path / "b.bin").exists()
        with pytest.raises(ExportRefused, match=r"no annotations\.xml"):
            ez.annotation_members("CVAT for images 1.1")


def test_export_zip_members_are_found_by_normalised_frame_name_not_by_stored_path(tmp_path: Path) -> None:
    path = tmp_path / "odd.zip"
    path.write_bytes(write_zip([RawMember("images/default//tmp/x/a.jpg", b"1"),
                                RawMember("images/default/./b.jpg", b"2"),
                                RawMember("images/default/../../etc/passwd", b"3"), RawMember("images/c.jpg", b"4")]))
    with ExportZip(path, 1, max_bytes=8 << 30, max_ratio=200) as ez:
        assert sorted(ez.image_members("COCO 1.0")) == ["b.jpg", "tmp/x/a.jpg"]  # '..' members are never used
        assert sorted(ez.image_members("CVAT for images 1.1")) == ["c.jpg", "default/b.jpg", "default/tmp/x/a.jpg"]


def test_sizes_and_ratios_from_the_config_and_the_command_line(tmp_path: Path) -> None:
    assert parse_size("8G") == 8 << 30 and parse_size("500M") == 500 << 20 and parse_size(1024) == 1024
    assert parse_size("1.5GiB") == 3 << 29 and parse_ratio("150") == 150.0
    for bad in ("-1", "0", "lots", "8X", True):
        with pytest.raises(ConfigError):
            parse_size(bad)
    for bad in ("0.5", "many", float("inf")):
        with pytest.raises(ConfigError):
            parse_ratio(bad)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("url: https://cvat.example\nmax_export_size: 2G\nmax_export_ratio: 50\n")
    os.chmod(cfg, 0o600)
    s = load_settings(cfg, env={})
    assert (s.max_export_bytes, s.max_export_ratio) == (2 << 30, 50.0)
    assert (load_settings(None, env={"CVAT_URL": "https://x.example", "HOME": str(tmp_path)}).max_export_bytes
            == 8 << 30)


# --- what the server says is checked ---------------------------------------------------------------

def test_malformed_shapes_are_counted_not_raised() -> None:
    annotations = {"shapes": [
        "not a shape",
        {"id": 1, "type": "polygon", "frame": "x", "label_id": 5, "points": [0, 0, 10, 0, 10, 10]},
        {"id": 2, "type": "polygon", "frame": 0, "label_id": 5, "points": [0, 0, "a", 0, 10, 10]},
        {"id": 3, "type": "polygon", "frame": 0, "label_id": 5, "points": [0, 0, float("nan"), 0, 10, 10]},
        {"id": 4, "type": "mask", "frame": 0, "label_id": 5, "points": [1e12, 0.0, 0.0, 999_999.0, 999_999.0]},
        {"id": 5, "type": "mask", "frame": 0, "label_id": 5, "points": [2.0, 2.0, 0.0, 0.0, 1.0, 1.0]},
        {"id": 6, "type": "polygon", "frame": 0, "label_id": 5, "points": [0, 0, 10, 0, 10, 10]},
    ], "tracks": "not a list"}
    converted = convert_annotations(annotations, {5: "basophil"}, frame_sizes={0: (100, 80)})
    assert converted.skipped == {"malformed shapes": 2, "shapes with broken geometry": 3}
    assert [i.kind for i in converted.frames[0]] == ["mask", "polygon"]
    assert convert_annotations([], {5: "basophil"}).frames == {}  # type: ignore[arg-type]


def test_the_lock_file_exists_only_while_a_pull_holds_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with task_lock(out, 7):
        assert (out / ".task-7.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(StoreError, match="another pull of task 7"), task_lock(out, 7):
            pass
    assert not (out / ".task-7.lock").exists()
    with task_lock(out, 7):  # and it can be taken again
        pass
    assert list(out.iterdir()) == []
