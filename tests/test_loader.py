"""load_dataset: format sniffing, the label map report, and image validation."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from wbc_core.data.coco import write_coco
from wbc_core.data.cvat_xml import write_cvat_xml
from wbc_core.data.loader import COCO, CVAT_XML, load_dataset, sniff_format, validate_images
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import RVPBS_LABELS, LabelMap

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAPTURES = SHARED / "reference" / "cvat-2.23.1-captures"
CVAT_ZIP = CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"
COCO_ZIP = CAPTURES / "task-export-coco-1.0-with-images.zip"
RVPBS_XML = SHARED / "data" / "rvpbs-annotations" / "BASOPHILS.xml"

needs_zips = pytest.mark.skipif(not (CVAT_ZIP.is_file() and COCO_ZIP.is_file()),
                                reason=f"CVAT capture zips not found in {CAPTURES} "
                                "(clone the project with ../shared beside it)")
needs_rvpbs = pytest.mark.skipif(not RVPBS_XML.is_file(), reason=f"{RVPBS_XML} not found")

TRIANGLE = [[2, 2], [20, 2], [10, 15]]


def small_dataset() -> AnnotatedDataset:
    shapes = [Instance("basophil", polygon=TRIANGLE), Instance("NEUTROPHIL", polygon=TRIANGLE),
              Instance("platelet", polygon=TRIANGLE), Instance("platelet", polygon=TRIANGLE),
              Instance("bg", polygon=TRIANGLE), Instance("lymphocyte", box=(1.0, 1.0, 9.0, 9.0))]
    return AnnotatedDataset(images=[ImageRecord("a.jpg", 40, 30, instances=shapes)],
                            labels=["bg", "basophil", "NEUTROPHIL", "platelet", "lymphocyte"])


def label_map() -> LabelMap:
    return LabelMap(aliases={"NEUTROPHIL": "neutrophil"})


# --- sniffing ---------------------------------------------------------------------------------------

@needs_zips
def test_sniff_real_zips_and_folders(tmp_path: Path) -> None:
    assert sniff_format(CVAT_ZIP) == CVAT_XML
    assert sniff_format(COCO_ZIP) == COCO
    for zip_path in (CVAT_ZIP, COCO_ZIP):
        folder = tmp_path / zip_path.stem
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(folder)
        ds = load_dataset(folder, label_map=LabelMap(), require_images=True)
        assert len(ds) == 6 and ds.meta["rectangles_without_outline"] == 1
    assert sniff_format(tmp_path / CVAT_ZIP.stem) == CVAT_XML
    assert sniff_format(tmp_path / CVAT_ZIP.stem / "annotations.xml") == CVAT_XML
    assert sniff_format(tmp_path / COCO_ZIP.stem) == COCO
    assert sniff_format(tmp_path / COCO_ZIP.stem / "annotations" / "instances_default.json") == COCO


@needs_zips
def test_load_both_real_zips_agree(tmp_path: Path) -> None:
    xml = load_dataset(CVAT_ZIP, label_map=LabelMap(), require_images=True, extract_dir=tmp_path / "x")
    coco = load_dataset(COCO_ZIP, label_map=LabelMap(), require_images=True, extract_dir=tmp_path / "c")
    assert xml.label_counts() == coco.label_counts() == {"basophil": 4, "neutrophil": 1, "lymphocyte": 1}
    assert xml.labels == coco.labels == list(RVPBS_LABELS)
    assert xml.meta["skipped_labels"] == coco.meta["skipped_labels"] == {}


def test_sniff_by_content_and_errors(tmp_path: Path) -> None:
    ds = small_dataset()
    write_cvat_xml(ds, tmp_path / "task.export")
    write_coco(ds, tmp_path / "task.data")
    assert sniff_format(tmp_path / "task.export") == CVAT_XML
    assert sniff_format(tmp_path / "task.data") == COCO
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"notes.txt.*neither XML nor JSON"):
        sniff_format(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*neither annotations.xml nor"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match=r"missing.zip.*no such file"):
        load_dataset(tmp_path / "missing.zip")
    odd_zip = tmp_path / "odd.zip"
    with zipfile.ZipFile(odd_zip, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(DatasetError, match=r"odd.zip.*neither annotations.xml"):
        load_dataset(odd_zip)


@needs_zips
def test_truncated_zip(tmp_path: Path) -> None:
    data = CVAT_ZIP.read_bytes()
    path = tmp_path / "half.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"half.zip.*truncated"):
        load_dataset(path, extract_dir=tmp_path / "x")


# --- the label map ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["xml", "coco"])
def test_label_map_report(fmt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / ("annotations.xml" if fmt == "xml" else "instances_default.json")
    (write_cvat_xml if fmt == "xml" else write_coco)(small_dataset(), path)
    with caplog.at_level(logging.WARNING, logger="wbc_core.data.loader"):
        ds = load_dataset(path, label_map=label_map())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'platelet' (2)" in w for w in warnings)
    assert not any("'bg'" in w for w in warnings)  # ignored silently
    assert [i.label for i in ds.images[0].instances] == ["basophil", "neutrophil", "lymphocyte"]
    assert ds.meta["skipped_labels"] == {"platelet": 2}
    assert ds.meta["ignored_labels"] == {"bg": 1}
    assert ds.meta["rectangles_without_outline"] == 1
    assert ds.labels == list(RVPBS_LABELS)
    assert "NEUTROPHIL" in ds.meta["source_labels"]


def test_label_map_strict(tmp_path: Path) -> None:
    path = tmp_path / "annotations.xml"
    write_cvat_xml(small_dataset(), path)
    with pytest.raises(DatasetError, match=r"annotations.xml.*'platelet' \(2\)"):
        load_dataset(path, label_map=label_map(), strict=True)


def test_no_label_map_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "annotations.xml"
    write_cvat_xml(small_dataset(), path)
    ds = load_dataset(path)
    assert len(ds.images[0].instances) == 6 and ds.meta["skipped_labels"] == {}


@needs_rvpbs
def test_real_rvpbs_with_label_map(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(RVPBS_XML, label_map=LabelMap())
    assert ds.label_counts() == {"basophil": 28}
    assert ds.meta["skipped_labels"] == {} and ds.meta["rectangles_without_outline"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    expected = r"(?s)26 of 26 images are unusable.*IMG_2783.jpg: image file not found.*looked up in"
    with pytest.raises(DatasetError, match=expected):
        load_dataset(RVPBS_XML, require_images=True)


# --- images -------------------------------------------------------------------------------------------

@needs_zips
def test_require_images_reports_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    with zipfile.ZipFile(CVAT_ZIP) as zf:
        zf.extractall(folder)
    images = folder / "images"
    (images / "IMG_2783.jpg").unlink()  # missing
    (images / "IMG_2789.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")  # corrupt
    Image.new("RGB", (640, 480)).save(images / "IMG_2799.jpg")  # wrong size
    load_dataset(folder)  # annotations alone are fine
    with pytest.raises(DatasetError) as err:
        load_dataset(folder, require_images=True)
    message = str(err.value)
    assert "3 of 6 images are unusable" in message
    assert "IMG_2783.jpg: image file not found" in message
    assert "IMG_2789.jpg: not a readable image" in message
    assert "IMG_2799.jpg: image is 640x480 but the annotations say 1008x756" in message
    assert "IMG_2993.jpg" not in message


def test_validate_images_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 40x30 sensor image is shown (and decoded by cv2) as 30x40
    Image.new("RGB", (40, 30)).save(tmp_path / "rot.jpg", exif=exif)
    png = tmp_path / "plain.png"
    Image.new("RGB", (12, 10)).save(png)
    ok = AnnotatedDataset(images=[ImageRecord("rot.jpg", 30, 40, path=tmp_path / "rot.jpg"),
                                  ImageRecord("plain.png", 12, 10, path=png)], labels=[])
    validate_images(ok)
    bad = AnnotatedDataset(images=[ImageRecord("rot.jpg", 40, 30, path=tmp_path / "rot.jpg")], labels=[],
                           source="s")
    with pytest.raises(DatasetError, match=r"rot.jpg: image is 30x40"):
        validate_images(bad)
