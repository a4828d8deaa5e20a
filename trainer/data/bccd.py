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

from trainer.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance

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
