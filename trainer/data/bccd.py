"""BCCD smear fields with hand-drawn WBC masks (the real-data segmentation benchmark).

Layout (as published; see ``../shared/data/bccd-wbc/README.md``): ``JPEGImages/BloodImage_NNNNN.jpg``,
``masks_nucleus_cytoplasm/BloodImage_Mask_NNNNN.png`` (0 background, ~155-161 cytoplasm,
255 nucleus, antialiased edges) and ``ImageSets/Main/{train,val,trainval,test}.txt``.
Each connected component of ``mask >= 64`` larger than 200 px is one WBC instance.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance

WBC_LABEL = "wbc"
MASK_THRESHOLD = 64
MIN_COMPONENT_PX = 200


def mask_instances(mask_png: Path, label: str = WBC_LABEL) -> list[Instance]:
    gray = cv2.imread(str(mask_png), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise DatasetError(f"cannot read mask {mask_png}")
    binary = (gray >= MASK_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if area <= MIN_COMPONENT_PX:
            continue
        crop = labels[y:y + h, x:x + w] == i
        out.append(Instance(label=label, mask_crop=crop, mask_origin=(int(x), int(y))))
    return out


def load_bccd(root: str | Path, split: str) -> AnnotatedDataset:
    """Frames of one BCCD split (``train``, ``val``, ``trainval`` or ``test``) with WBC instance masks."""
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"{split_file} not found: is {root} the bccd-wbc folder?")
    records = []
    for line in split_file.read_text().split():
        name = line.strip()
        image = root / "JPEGImages" / f"{name}.jpg"
        mask = root / "masks_nucleus_cytoplasm" / f"{name.replace('BloodImage_', 'BloodImage_Mask_')}.png"
        if not image.is_file() or not mask.is_file():
            raise DatasetError(f"BCCD frame {name}: missing {image if not image.is_file() else mask}")
        h, w = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).shape
        records.append(ImageRecord(name=f"{name}.jpg", width=w, height=h, path=image,
                                   instances=mask_instances(mask)))
    return AnnotatedDataset(images=records, labels=[WBC_LABEL], source=f"{root} ({split})")


def read_voc_boxes(xml_path: Path, label: str = "RBC") -> list[list[float]]:
    """Boxes ``[x0, y0, x1, y1]`` (native pixels, x1/y1 exclusive) of the objects named ``label`` (case-insensitive)
    in one Pascal VOC annotation file. Raises :class:`DatasetError` naming the file when it cannot be parsed."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DatasetError(f"cannot read VOC annotation {xml_path}: {exc}") from exc
    boxes = []
    for obj in root.iter("object"):
        if (obj.findtext("name") or "").strip().lower() != label.lower():
            continue
        bb = obj.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError) as exc:
            raise DatasetError(f"{xml_path}: a {label} object has no valid bndbox") from exc
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
    return boxes


def voc_rbc_diameter(xml_path: Path) -> tuple[float | None, int]:
    """Median (w + h) / 2 of a VOC file's RBC boxes that do not touch the image border (a red cell cut by the
    border is not its size), and how many there are: the ground truth for red-cell scale estimates."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml_path).getroot()
        width, height = int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0)
    except (OSError, ET.ParseError, ValueError) as exc:
        raise DatasetError(f"cannot read VOC annotation {xml_path}: {exc}") from exc
    sizes = [((x1 - x0) + (y1 - y0)) / 2 for x0, y0, x1, y1 in read_voc_boxes(xml_path, "RBC")
             if x0 > 1 and y0 > 1 and x1 < width - 2 and y1 < height - 2]
    return (float(np.median(sizes)) if sizes else None), len(sizes)


def bccd_rbc_boxes(root: str | Path, names: list[str]) -> dict[str, list[list[float]]]:
    """RBC boxes of BCCD frames from ``Annotations/<stem>.xml`` (VOC), keyed by frame name (``BloodImage_NNNNN.jpg``,
    as :func:`load_bccd` names them). Frames without an XML get no entry."""
    out = {}
    for name in names:
        xml = Path(root) / "Annotations" / f"{Path(name).stem}.xml"
        if xml.is_file():
            out[name] = read_voc_boxes(xml, "RBC")
    return out
