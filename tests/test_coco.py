"""COCO 1.0: the real CVAT 2.23.1 COCO zip, its equivalence with the CVAT XML zip, writing, bad input."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from wbc_core.data import masks as M
from wbc_core.data.coco import compressed_rle_counts, read_coco, write_coco
from wbc_core.data.cvat_xml import read_cvat_xml
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import RVPBS_LABELS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RVPBS = SHARED / "data" / "rvpbs-annotations"
CAPTURES = SHARED / "reference" / "cvat-2.23.1-captures"
CVAT_ZIP = CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"
COCO_ZIP = CAPTURES / "task-export-coco-1.0-with-images.zip"

needs_rvpbs = pytest.mark.skipif(not RVPBS.is_dir(), reason=f"RV-PBS annotations not found at {RVPBS} "
                                 "(clone the project with ../shared beside it)")
needs_zips = pytest.mark.skipif(not (CVAT_ZIP.is_file() and COCO_ZIP.is_file()),
                                reason=f"CVAT capture zips not found in {CAPTURES}")
ALL_REAL = ["BASOPHILS.xml", "LYMPHOCYTES.xml", "METAMYELOCYTES.xml", "MONOCYTES.xml",
            "test-subset/NEUTROPHILS.xml", "test-subset/BLAST_CELLS.xml", "test-subset/EOSINOPHILS.xml"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return M.mask_iou(a, b)


# --- the real COCO export, and the same task as CVAT XML --------------------------------------------

@needs_zips
def test_real_coco_zip(tmp_path: Path) -> None:
    ds = read_coco(COCO_ZIP, extract_dir=tmp_path)
    assert ds.labels == list(RVPBS_LABELS)  # category ids 1..10 in label order
    assert [img.frame_id for img in ds.images] == [1, 2, 3, 4, 5, 6]
    assert all(img.path == tmp_path / "images" / "default" / img.name for img in ds.images)
    mask = ds.images[1].instances[2]
    assert (mask.label, mask.kind, int(mask.mask_crop.sum())) == ("neutrophil", "mask", 2861)
    assert mask.mask_origin == (762, 94) and mask.box == (762.0, 94.0, 831.0, 147.0)
    rect = ds.images[4].instances[0]
    assert (rect.kind, rect.box, rect.attributes) == ("rectangle", (300.0, 200.0, 380.5, 275.25), {})


@needs_zips
def test_cvat_zip_and_coco_zip_are_the_same_task(tmp_path: Path) -> None:
    xml = read_cvat_xml(CVAT_ZIP, extract_dir=tmp_path / "xml")
    coco = read_coco(COCO_ZIP, extract_dir=tmp_path / "coco")
    assert xml.labels == coco.labels
    assert [(i.name, i.width, i.height) for i in xml.images] == \
        [(i.name, i.width, i.height) for i in coco.images]
    kinds = []
    for a, b in zip(xml.images, coco.images, strict=True):
        assert [s.label for s in a.instances] == [s.label for s in b.instances]
        for sa, sb in zip(a.instances, b.instances, strict=True):
            assert sa.kind == sb.kind and sa.occluded == sb.occluded
            kinds.append(sa.kind)
            if sa.has_outline:
                assert iou(sa.to_mask(a.height, a.width), sb.to_mask(b.height, b.width)) >= 0.99
            np.testing.assert_allclose(sa.box, sb.box, atol=0.01)
        assert a.path.read_bytes() == b.path.read_bytes()
    assert sorted(set(kinds)) == ["mask", "polygon", "rectangle"]


@needs_zips
def test_write_coco_matches_cvats_own_export(tmp_path: Path) -> None:
    xml = read_cvat_xml(CVAT_ZIP, extract_dir=tmp_path / "xml")
    out = tmp_path / "instances_default.json"
    write_coco(xml, out)
    ours = json.loads(out.read_text())
    with zipfile.ZipFile(COCO_ZIP) as zf:
        theirs = json.loads(zf.read("annotations/instances_default.json"))
    assert ours["categories"] == theirs["categories"]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in ours["images"]] == \
        [(i["id"], i["file_name"], i["width"], i["height"]) for i in theirs["images"]]
    assert len(ours["annotations"]) == len(theirs["annotations"])
    for a, b in zip(ours["annotations"], theirs["annotations"], strict=True):
        for key in ("id", "image_id", "category_id", "iscrowd", "segmentation", "attributes"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.011)
        assert a["area"] == pytest.approx(b["area"])
    # and pycocotools reads what we wrote
    api = COCO(str(out))
    ann = api.loadAnns(api.getAnnIds(imgIds=[2], catIds=[7]))[0]
    assert int(api.annToMask(ann).sum()) == 2861


# --- round trips -----------------------------------------------------------------------------------

@needs_rvpbs
@pytest.mark.parametrize("name", ALL_REAL)
def test_xml_to_coco_round_trip(name: str, tmp_path: Path) -> None:
    original = read_cvat_xml(RVPBS / name)
    write_coco(original, tmp_path / "instances_default.json")
    again = read_coco(tmp_path / "instances_default.json")
    assert again.labels == original.labels
    assert [(i.name, i.width, i.height) for i in again.images] == \
        [(i.name, i.width, i.height) for i in original.images]
    for a, b in zip(original.images, again.images, strict=True):
        assert [s.label for s in a.instances] == [s.label for s in b.instances]
        for sa, sb in zip(a.instances, b.instances, strict=True):
            ma, mb = sa.to_mask(a.height, a.width, scale=0.25), sb.to_mask(b.height, b.width, scale=0.25)
            assert iou(ma, mb) >= 0.99


def test_write_read_masks_boxes_attributes(tmp_path: Path) -> None:
    crop = np.zeros((5, 6), dtype=bool)
    crop[1:4, 2:5] = True
    ds = AnnotatedDataset(
        images=[ImageRecord("a.png", 30, 20, instances=[
            Instance("wbc", mask_crop=crop, mask_origin=(10, 4), attributes={"stage": "late"}, occluded=True,
                     source="auto"),
            Instance("rbc", box=(1.0, 2.0, 5.5, 7.25), score=0.75)])],
        labels=["wbc"])
    path = tmp_path / "out" / "instances_default.json"
    write_coco(ds, path)
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == ["wbc", "rbc"]  # unlisted label appended
    mask_ann, box_ann = data["annotations"]
    assert mask_ann["iscrowd"] == 1 and mask_ann["segmentation"]["size"] == [20, 30]
    assert mask_ann["bbox"] == [12, 5, 3, 3] and mask_ann["area"] == 9
    assert mask_ann["attributes"] == {"occluded": True, "stage": "late"}
    assert box_ann["segmentation"] == [] and box_ann["bbox"] == [1.0, 2.0, 4.5, 5.25]
    assert box_ann["score"] == 0.75
    # CVAT's COCO has no source; ours keeps any but "manual" (which cells the function drew, untouched)
    assert mask_ann["source"] == "auto" and "source" not in box_ann
    back = read_coco(path)
    assert [i.source for i in back.images[0].instances] == ["auto", "manual"]
    m = back.images[0].instances[0]
    assert np.array_equal(m.to_mask(20, 30), ds.images[0].instances[0].to_mask(20, 30))
    assert m.occluded and m.attributes == {"stage": "late"}
    rect = back.images[0].instances[1]
    assert rect.box == (1.0, 2.0, 5.5, 7.25) and rect.score == 0.75
    COCO(str(path))  # loadable


def coco_file(tmp_path: Path, annotations: list[dict], name: str = "instances_default.json",
              images: list[dict] | None = None) -> Path:
    data = {"images": images if images is not None else [{"id": 1, "file_name": "IMG_1.jpg", "width": 40,
                                                          "height": 30}],
            "categories": [{"id": 1, "name": "wbc"}], "annotations": annotations}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_multipart_polygon_and_compressed_rle(tmp_path: Path) -> None:
    parts = [[2, 2, 10, 2, 10, 9, 2, 9], [20.5, 12, 31, 12, 25, 25.5]]
    full = np.zeros((30, 40), dtype=bool)
    full[3:8, 30:36] = True
    rle = M.coco_rle_encode(full, compressed=True)
    path = coco_file(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": parts, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 1}])
    multi, compressed = read_coco(path).images[0].instances
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, 30, 40))).astype(bool)
    assert multi.kind == "mask" and np.array_equal(multi.to_mask(30, 40), expected)
    assert compressed.kind == "mask" and np.array_equal(compressed.to_mask(30, 40), full)
    assert compressed.mask_origin == (30, 3) and compressed.mask_crop.shape == (5, 6)


def test_folder_with_subsets(tmp_path: Path) -> None:
    for subset, name in (("train", "a.jpg"), ("val", "b.jpg")):
        ds = AnnotatedDataset(images=[ImageRecord(name, 40, 30, instances=[
            Instance("wbc", polygon=[[1, 1], [9, 1], [5, 8]])])], labels=["wbc"])
        write_coco(ds, tmp_path / "annotations" / f"instances_{subset}.json")
        (tmp_path / "images" / subset).mkdir(parents=True)
        (tmp_path / "images" / subset / name).write_bytes(b"x")
    both = read_coco(tmp_path)
    assert [img.name for img in both.images] == ["a.jpg", "b.jpg"] and both.labels == ["wbc"]
    assert [img.path for img in both.images] == [tmp_path / "images" / "train" / "a.jpg",
                                                 tmp_path / "images" / "val" / "b.jpg"]


@pytest.mark.parametrize("seed", range(3))
def test_compressed_rle_counts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < 0.4
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert compressed_rle_counts(rle["counts"]) == M.coco_rle_encode(mask, compressed=False)["counts"]


# --- bad input -------------------------------------------------------------------------------------

def ann(segmentation: object, **kw: object) -> dict:
    return {"id": 7, "image_id": 1, "category_id": 1, "segmentation": segmentation, "bbox": [1, 1, 2, 2],
            **kw}


BAD_ANNOTATIONS = {
    "unknown_category": (ann([[1, 1, 5, 1, 5, 5]], category_id=9), "category_id 9"),
    "unknown_image": (ann([[1, 1, 5, 1, 5, 5]], image_id=5), "image_id 5"),
    "rle_size": (ann({"size": [10, 10], "counts": [100]}), "does not match"),
    "rle_sum": (ann({"size": [30, 40], "counts": [5, 3]}), "covers 8 pixels"),
    "rle_garbage": (ann({"size": [30, 40], "counts": "\x01\x02"}), "bad RLE"),
    "two_points": (ann([[1, 1, 5, 5]]), "at least 3"),
    "far_out": (ann([[1, 1, 50, 1, 5, 5]]), "outside the 40x30 frame"),
    "no_bbox": ({"id": 7, "image_id": 1, "category_id": 1, "segmentation": []}, "bbox"),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotations(case: str, tmp_path: Path) -> None:
    annotation, expected = BAD_ANNOTATIONS[case]
    path = coco_file(tmp_path, [annotation], name=f"bad_{case}.json")
    with pytest.raises(DatasetError) as err:
        read_coco(path)
    assert path.name in str(err.value) and expected in str(err.value)
    if case != "unknown_image":
        assert "IMG_1.jpg" in str(err.value) and "annotation #0" in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken.json.*not valid JSON"):
        read_coco(broken)
    with pytest.raises(DatasetError, match=r"empty.json.*zero frames"):
        read_coco(coco_file(tmp_path, [], name="empty.json", images=[]))
    no_size = coco_file(tmp_path, [], name="no_size.json",
                        images=[{"id": 1, "file_name": "a.jpg", "width": 4}])
    with pytest.raises(DatasetError, match=r"no_size.json.*'a.jpg'.*height"):
        read_coco(no_size)
    huge = coco_file(tmp_path, [ann({"size": [100000, 100000], "counts": [10**10]})], name="huge.json",
                     images=[{"id": 1, "file_name": "IMG_1.jpg", "width": 100000, "height": 100000}])
    with pytest.raises(DatasetError, match=r"huge.json.*'IMG_1.jpg'.*100000x100000 is over"):
        read_coco(huge)  # refused before any mask of it is decoded
    not_zip = tmp_path / "nojson.zip"
    with zipfile.ZipFile(not_zip, "w") as zf:
        zf.writestr("images/a.jpg", b"x")
    with pytest.raises(DatasetError, match=r"nojson.zip.*no COCO instances JSON"):
        read_coco(not_zip, extract_dir=tmp_path / "x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError, match=r"folder has no annotations/instances_"):
        read_coco(tmp_path / "folder")


@needs_zips
def test_truncated_coco_zip(tmp_path: Path) -> None:
    data = COCO_ZIP.read_bytes()
    path = tmp_path / "coco_truncated.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"coco_truncated.zip.*truncated"):
        read_coco(path, extract_dir=tmp_path / "x")
