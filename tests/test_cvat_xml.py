"""CVAT for images 1.1 XML: the real RV-PBS exports, the real CVAT 2.23.1 zip, round trips, bad input."""

from __future__ import annotations

import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from wbc_core.data import masks as M
from wbc_core.data.cvat_xml import RVPBS_COLORS, read_cvat_xml, write_cvat_xml
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance
from wbc_core.labels import RVPBS_LABELS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RVPBS = SHARED / "data" / "rvpbs-annotations"
CAPTURES = SHARED / "reference" / "cvat-2.23.1-captures"
CVAT_ZIP = CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"

needs_rvpbs = pytest.mark.skipif(not RVPBS.is_dir(), reason=f"RV-PBS annotations not found at {RVPBS} "
                                 "(clone the project with ../shared beside it)")
needs_zip = pytest.mark.skipif(not CVAT_ZIP.is_file(), reason=f"CVAT capture zip not found at {CVAT_ZIP}")

# file -> (images, polygons), from rvpbs-annotations/README.md
FULL_FILES = {"BASOPHILS.xml": (26, 28), "LYMPHOCYTES.xml": (60, 62), "METAMYELOCYTES.xml": (31, 32),
              "MONOCYTES.xml": (53, 54)}
SUBSET_PER_LABEL = {"neutrophil": 12, "myelocyte": 9, "blast cell": 8, "eosinophil": 7, "band cell": 6,
                    "lymphocyte": 6, "monocyte": 6, "metamyelocyte": 4, "promyelocyte": 3, "basophil": 2}
SUBSET_FILES = ["BAND_CELLS.xml", "BASOPHILS.xml", "BLAST_CELLS.xml", "EOSINOPHILS.xml", "LYMPHOCYTES.xml",
                "METAMYELOCYTES.xml", "MONOCYTES.xml", "MYELOCYTE.xml", "NEUTROPHILS.xml",
                "PROMYELOCYTES.xml"]
ALL_REAL = list(FULL_FILES) + [f"test-subset/{name}" for name in SUBSET_FILES]


def polygon_count(ds: AnnotatedDataset) -> int:
    return sum(inst.kind == "polygon" for img in ds.images for inst in img.instances)


# --- the real RV-PBS exports ---------------------------------------------------------------------

@needs_rvpbs
@pytest.mark.parametrize("name", list(FULL_FILES))
def test_real_full_file(name: str) -> None:
    path = RVPBS / name
    ds = read_cvat_xml(path)
    size = int(ET.parse(path).getroot().findtext("meta/task/size"))
    n_images, n_polygons = FULL_FILES[name]
    assert len(ds) == size == n_images
    assert polygon_count(ds) == n_polygons
    assert ds.labels == ["bg", *RVPBS_LABELS]
    assert set(ds.label_counts()) <= set(RVPBS_LABELS)
    assert [img.frame_id for img in ds.images] == list(range(size))  # sorted, whatever the file order
    assert all(img.path is None for img in ds.images)  # annotation-only export
    for img in ds.images:
        for inst in img.instances:
            assert inst.polygon is not None and len(inst.polygon) >= 3
            assert (inst.polygon >= 0).all() and (inst.polygon <= [img.width, img.height]).all()


@needs_rvpbs
def test_real_files_frame_sizes_and_order() -> None:
    lymph = read_cvat_xml(RVPBS / "LYMPHOCYTES.xml")
    odd = {img.name: (img.width, img.height) for img in lymph.images if img.name.startswith("psb_")}
    assert odd == {f"psb_2_slide_{i}.png": (3302, 2476) for i in (5, 6, 11, 12)}
    assert Counter((img.width, img.height) for img in lymph.images)[(4032, 3024)] == 56
    # LYMPHOCYTES lists images in descending id order: the file's first <image> is the last frame
    first_in_file = ET.parse(RVPBS / "LYMPHOCYTES.xml").getroot().find("image")
    assert int(first_in_file.get("id")) == 59 and lymph.images[-1].name == first_in_file.get("name")


@needs_rvpbs
def test_real_repeated_vertex_is_kept() -> None:
    ds = read_cvat_xml(RVPBS / "MONOCYTES.xml")
    img = next(i for i in ds.images if i.name == "IMG_3477.jpg")
    poly = img.instances[0].polygon
    assert (np.diff(poly, axis=0) == 0).all(axis=1).any()
    assert img.instances[0].to_mask(img.height, img.width, scale=0.25).sum() > 100


@needs_rvpbs
def test_real_test_subset() -> None:
    parts = [read_cvat_xml(RVPBS / "test-subset" / name) for name in SUBSET_FILES]
    assert sum(len(p) for p in parts) == 58
    assert sum(polygon_count(p) for p in parts) == 63
    counts: Counter[str] = Counter()
    for p in parts:
        counts.update(p.label_counts())
        assert p.labels == list(p.label_counts())  # no <meta>: labels come from the shapes
        ids = [img.frame_id for img in p.images]
        assert ids == sorted(ids)
    assert dict(counts) == SUBSET_PER_LABEL


# --- round trip ----------------------------------------------------------------------------------

def assert_same(a: AnnotatedDataset, b: AnnotatedDataset) -> None:
    assert a.labels == b.labels
    assert [(i.name, i.width, i.height, i.frame_id) for i in a.images] == \
        [(i.name, i.width, i.height, i.frame_id) for i in b.images]
    for ia, ib in zip(a.images, b.images, strict=True):
        assert len(ia.instances) == len(ib.instances)
        for sa, sb in zip(ia.instances, ib.instances, strict=True):
            assert (sa.label, sa.kind, sa.occluded, sa.source, sa.attributes) == \
                (sb.label, sb.kind, sb.occluded, sb.source, sb.attributes)
            if sa.polygon is not None:
                assert sa.polygon.shape == sb.polygon.shape
                np.testing.assert_allclose(sa.polygon, sb.polygon, atol=0.01)
            elif sa.mask_crop is not None:
                assert np.array_equal(sa.to_mask(ia.height, ia.width), sb.to_mask(ib.height, ib.width))
            else:
                np.testing.assert_allclose(sa.box, sb.box, atol=0.01)


@needs_rvpbs
@pytest.mark.parametrize("name", ALL_REAL)
def test_round_trip_real_files(name: str, tmp_path: Path) -> None:
    original = read_cvat_xml(RVPBS / name)
    out = tmp_path / "annotations.xml"
    write_cvat_xml(original, out, task_name="round trip")
    again = read_cvat_xml(out)
    assert_same(original, again)
    assert again.meta["task_name"] == "round trip"
    assert [p.name for p in tmp_path.iterdir()] == ["annotations.xml"]  # no temp file left behind


@needs_zip
def test_round_trip_real_zip_masks_and_boxes(tmp_path: Path) -> None:
    original = read_cvat_xml(CVAT_ZIP, extract_dir=tmp_path / "x")
    write_cvat_xml(original, tmp_path / "out.xml")
    assert_same(original, read_cvat_xml(tmp_path / "out.xml"))
    # the written <mask> carries exactly the RLE and box CVAT wrote
    src = ET.parse(tmp_path / "x" / "annotations.xml").getroot().find(".//mask")
    out = ET.parse(tmp_path / "out.xml").getroot().find(".//mask")
    for key in ("rle", "left", "top", "width", "height", "label"):
        assert src.get(key) == out.get(key), key
    box = ET.parse(tmp_path / "out.xml").getroot().find(".//box")
    assert [box.get(k) for k in ("xtl", "ytl", "xbr", "ybr")] == ["300.00", "200.00", "380.50", "275.25"]


def test_writer_structure_and_colours(tmp_path: Path) -> None:
    crop = np.zeros((6, 7), dtype=bool)
    crop[2:5, 1:4] = True  # loose crop: the writer tightens it
    ds = AnnotatedDataset(
        images=[ImageRecord("a.jpg", 40, 30, instances=[
            Instance("basophil", polygon=[[1, 1], [10.126, 1], [10, 9.5]], occluded=True, source="auto",
                     attributes={"stage": "late"}),
            Instance("wbc", mask_crop=crop, mask_origin=(20, 10)),
            Instance("lymphocyte", box=(2.0, 3.0, 12.5, 13.25))])],
        labels=["basophil", "lymphocyte", "wbc"])
    out = tmp_path / "sub" / "annotations.xml"
    write_cvat_xml(ds, out)
    root = ET.parse(out).getroot()
    assert root.findtext("version") == "1.1"
    assert root.findtext("meta/task/size") == "1"
    labels = {lbl.findtext("name"): lbl for lbl in root.findall("meta/task/labels/label")}
    assert list(labels) == ["basophil", "lymphocyte", "wbc"]
    assert labels["basophil"].findtext("color") == RVPBS_COLORS["basophil"]
    assert labels["wbc"].findtext("color").startswith("#") and labels["wbc"].findtext("type") == "mask"
    assert labels["basophil"].find("attributes/attribute").findtext("name") == "stage"
    poly = root.find("image/polygon")
    assert poly.get("points") == "1.00,1.00;10.13,1.00;10.00,9.50"
    assert poly.find("attribute").get("name") == "stage" and poly.find("attribute").text == "late"
    mask = root.find("image/mask")
    assert [mask.get(k) for k in ("left", "top", "width", "height")] == ["21", "12", "3", "3"]
    assert mask.get("rle") == "0, 9"
    back = read_cvat_xml(out)
    assert back.images[0].instances[0].occluded and back.images[0].instances[0].source == "auto"
    assert np.array_equal(back.images[0].instances[1].to_mask(30, 40),
                          ds.images[0].instances[1].to_mask(30, 40))
    assert back.images[0].instances[2].box == (2.0, 3.0, 12.5, 13.25)


def test_writer_is_reproducible_with_a_timestamp(tmp_path: Path) -> None:
    ds = AnnotatedDataset(images=[ImageRecord("a.jpg", 40, 30, instances=[
        Instance("basophil", polygon=[[1, 1], [10, 1], [10, 9]])])], labels=["basophil"],
        meta={"timestamp": "2000-01-01 00:00:00+00:00"})
    write_cvat_xml(ds, tmp_path / "a.xml")
    write_cvat_xml(ds, tmp_path / "b.xml")
    assert (tmp_path / "a.xml").read_bytes() == (tmp_path / "b.xml").read_bytes()
    assert ET.parse(tmp_path / "a.xml").getroot().findtext("meta/dumped") == "2000-01-01 00:00:00+00:00"


# --- masks: the capture facts and the contract example --------------------------------------------

@needs_zip
def test_real_zip_contents(tmp_path: Path) -> None:
    ds = read_cvat_xml(CVAT_ZIP, extract_dir=tmp_path)
    assert [img.name for img in ds.images] == ["IMG_2783.jpg", "IMG_2789.jpg", "IMG_2799.jpg", "IMG_2993.jpg",
                                              "IMG_2994.jpg", "IMG_2995.jpg"]
    assert all(img.path is not None and img.path.is_file() and (img.width, img.height) == (1008, 756)
               for img in ds.images)
    assert ds.labels == list(RVPBS_LABELS)
    mask = ds.images[1].instances[2]
    assert (mask.label, mask.kind) == ("neutrophil", "mask")
    assert int(mask.mask_crop.sum()) == 2861
    full = mask.to_mask(756, 1008)
    assert int(full.sum()) == 2861
    _, (left, top, right, bottom) = M.tight_crop(full)
    assert (left, top, right, bottom) == (762, 94, 830, 146)
    assert mask.mask_origin == (762, 94) and mask.mask_crop.shape == (53, 69)
    rect = ds.images[4].instances[0]
    assert (rect.label, rect.kind, rect.box) == ("lymphocyte", "rectangle", (300.0, 200.0, 380.5, 275.25))
    # the stored RLE re-encodes to itself
    stored = ET.parse(tmp_path / "annotations.xml").getroot().find(".//mask").get("rle")
    rle = [int(v) for v in stored.split(",")]
    assert M.cvat_rle_encode(mask.mask_crop) == rle


@pytest.mark.parametrize("seed", range(4))
def test_cvat_rle_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 40, size=2)
    crop = rng.random((h, w)) < rng.uniform(0.1, 0.9)
    crop[0, 0] = bool(seed % 2)  # both a background and a foreground start
    rle = M.cvat_rle_encode(crop)
    assert sum(rle) == h * w and (rle[0] == 0) == bool(seed % 2)
    assert np.array_equal(M.cvat_rle_decode(rle, int(w), int(h)), crop)


def test_contract_example(tmp_path: Path) -> None:
    # cvat-contract.md 2.4: the server stores a function's mask as RLE + inclusive bbox; "a 4x5 crop with one
    # background pixel -> [1, 19, 3, 2, 7, 5]", i.e. runs [1 background, 19 foreground] over the 5-wide,
    # 4-high box x 3..7, y 2..5, so the background pixel is the crop's first (top-left) one.
    full = np.zeros((8, 10), dtype=bool)
    full[2:6, 3:8] = True
    full[2, 3] = False
    function_mask = M.cvat_function_mask(full)  # what the Nuclio function sends: 0/255 crop + bbox
    assert function_mask[-4:] == [3, 2, 7, 5] and len(function_mask) == 20 + 4
    crop, box = M.decode_cvat_function_mask(function_mask)
    assert M.cvat_rle_encode(crop) + list(box) == [1, 19, 3, 2, 7, 5]
    assert M.cvat_mask_points(full) == [1, 19, 3, 2, 7, 5]
    # the same shape in an XML export reads back to the same pixels
    xml = tmp_path / "annotations.xml"
    xml.write_text('<annotations><image id="0" name="a.png" width="10" height="8">'
                   '<mask label="wbc" source="auto" occluded="0" rle="1, 19" left="3" top="2" width="5" '
                   'height="4" z_order="0"></mask></image></annotations>')
    inst = read_cvat_xml(xml).images[0].instances[0]
    assert np.array_equal(inst.to_mask(8, 10), full)
    assert inst.box == (3.0, 2.0, 8.0, 6.0)


# --- bad input -------------------------------------------------------------------------------------

def xml_with(body: str, width: int = 100, height: int = 80) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version>'
            f'<image id="0" name="IMG_1.jpg" width="{width}" height="{height}">{body}</image></annotations>')


BAD_SHAPES = {
    "two_points": ('<polygon label="basophil" points="1,1;5,5"/>', "at least 3"),
    "repeated_points": ('<polygon label="basophil" points="1,1;5,5;1,1;5,5"/>', "at least 3"),
    "far_out": ('<polygon label="basophil" points="1,1;50,5;50,85"/>', "outside the 100x80 frame"),
    "negative": ('<polygon label="basophil" points="-3,1;50,5;50,60"/>', "outside"),
    "not_numbers": ('<polygon label="basophil" points="1,1;a,b;3,3"/>', "not"),
    "rle_sum": ('<mask label="wbc" rle="3, 4" left="0" top="0" width="3" height="3"/>', "covers 7 pixels"),
    "mask_outside": ('<mask label="wbc" rle="0, 9" left="98" top="0" width="3" height="3"/>', "outside the"),
    "mask_no_rle": ('<mask label="wbc" left="0" top="0" width="3" height="3"/>', "rle"),
    "no_label": ('<polygon points="1,1;5,1;5,5"/>', "no label"),
    "box_far_out": ('<box label="wbc" xtl="1" ytl="1" xbr="120" ybr="5"/>', "outside"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_shapes(case: str, tmp_path: Path) -> None:
    body, expected = BAD_SHAPES[case]
    path = tmp_path / f"bad_{case}.xml"
    path.write_text(xml_with(body))
    with pytest.raises(DatasetError) as err:
        read_cvat_xml(path)
    message = str(err.value)
    assert path.name in message and "IMG_1.jpg" in message and "shape #0" in message
    assert expected in message


def test_tiny_overshoot_is_clipped(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    path.write_text(xml_with('<polygon label="wbc" points="-0.6,0;100.9,10;50,80.5"/>'
                             '<box label="wbc" xtl="-0.5" ytl="0" xbr="100.4" ybr="80"/>'))
    poly, box = read_cvat_xml(path).images[0].instances
    assert poly.polygon.min() == 0 and poly.polygon[:, 0].max() == 100 and poly.polygon[:, 1].max() == 80
    assert box.box == (0.0, 0.0, 100.0, 80.0)


BAD_FILES = {
    "missing_size": ('<annotations><image id="0" name="IMG_1.jpg" width="100"/></annotations>', "height"),
    "empty_task": ('<annotations><version>1.1</version><meta><task><size>0</size></task></meta>'
                   '</annotations>', "no <image>"),
    "duplicate_id": ('<annotations><image id="0" name="a.jpg" width="9" height="9"/>'
                     '<image id="0" name="b.jpg" width="9" height="9"/></annotations>', "both have id 0"),
    "wrong_root": ('<dataset><image id="0" name="a.jpg" width="9" height="9"/></dataset>', "<annotations>"),
    "not_xml": ("this is not xml", "not valid XML"),
    "zero_size": ('<annotations><image id="0" name="a.jpg" width="0" height="9"/></annotations>', "not positive"),
    # a frame whose every mask would be 10 GB: refused before anything is drawn
    "huge_frame": ('<annotations><image id="0" name="a.jpg" width="100000" height="100000"><polygon label="wbc" '
                   'points="1,1;5,1;5,5"/></image></annotations>', "100000x100000 is over"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(case: str, tmp_path: Path) -> None:
    text, expected = BAD_FILES[case]
    path = tmp_path / f"bad_{case}.xml"
    path.write_text(text)
    with pytest.raises(DatasetError, match="bad_") as err:
        read_cvat_xml(path)
    assert expected in str(err.value)


@needs_rvpbs
def test_truncated_xml(tmp_path: Path) -> None:
    text = (RVPBS / "BASOPHILS.xml").read_text()
    path = tmp_path / "BASOPHILS_truncated.xml"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"BASOPHILS_truncated.xml.*not valid XML"):
        read_cvat_xml(path)


@needs_zip
def test_truncated_zip(tmp_path: Path) -> None:
    data = CVAT_ZIP.read_bytes()
    path = tmp_path / "export_truncated.zip"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"export_truncated.zip.*truncated"):
        read_cvat_xml(path, extract_dir=tmp_path / "x")


def test_zip_without_annotations(tmp_path: Path) -> None:
    path = tmp_path / "no_xml.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/a.jpg", b"not really")
    with pytest.raises(DatasetError, match=r"no_xml.zip.*annotations.xml"):
        read_cvat_xml(path, extract_dir=tmp_path / "x")


def test_folder_without_annotations(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no annotations.xml"):
        read_cvat_xml(tmp_path)


def test_folder_and_images_dir(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "IMG_1.jpg").write_bytes(b"x")
    (tmp_path / "annotations.xml").write_text(xml_with(""))
    assert read_cvat_xml(tmp_path).images[0].path == tmp_path / "images" / "IMG_1.jpg"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "IMG_1.jpg").write_bytes(b"x")
    assert read_cvat_xml(tmp_path, images_dir=other).images[0].path == other / "IMG_1.jpg"


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.jpg", "images/../../outside.jpg", "a\0b.jpg",
                                  "C:/Windows/win.ini"])
def test_a_frame_name_leading_outside_the_dataset_is_never_read(tmp_path: Path, name: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13: an export's frame names must not make the loader read other files of this machine."""
    from wbc_core.data.cvat_xml import find_image

    (tmp_path / "outside.jpg").write_bytes(b"x")
    folder = tmp_path / "dataset"
    (folder / "images").mkdir(parents=True)
    assert find_image(name, [folder / "images", folder]) is None
    assert "outside the dataset folder" in caplog.text
    if "\0" not in name:  # XML cannot carry a NUL
        (folder / "annotations.xml").write_text(xml_with("").replace('name="IMG_1.jpg"', f'name="{name}"'))
        assert read_cvat_xml(folder).images[0].path is None


@pytest.mark.parametrize("declared", [None, 1024], ids=["honest-sizes", "lying-sizes"])
def test_a_zip_bomb_export_is_refused_and_nothing_is_left(tmp_path: Path, declared: int | None) -> None:
    """Issue 13: the trainer reading an export zip must not inflate a bomb (here 256 MiB from ~250 KB)."""
    from tests.cvat_standin.hostile import RawMember, deflate_zeros, write_zip

    bomb = write_zip([RawMember("annotations.xml", xml_with("").encode()),
                      RawMember("images/IMG_1.jpg", deflate_zeros(256 * 2**20), zipfile.ZIP_DEFLATED, crc=0,
                                file_size=256 * 2**20 if declared is None else declared)])
    path = tmp_path / "export.zip"
    path.write_bytes(bomb)
    out = tmp_path / "x"
    # honest sizes: refused from the directory; lying ones: zipfile stops at the declared size, the CRC fails
    with pytest.raises(DatasetError, match="zip bomb" if declared is None else "cannot extract"):
        read_cvat_xml(path, extract_dir=out)
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True
