"""One entry point for every annotation source: sniff the format, read it, apply the label map.

``load_dataset`` accepts a CVAT for images 1.1 export (``annotations.xml``, its folder or zip), a
COCO 1.0 export (instances JSON, its folder or zip) or a ``cvat_sync`` dataset folder (COCO layout).
It then maps dataset labels onto the model classes of a :class:`LabelMap` and reports what it
dropped in ``dataset.meta``:

- ``skipped_labels``: ``{label: count}`` of shapes whose label the map does not know (dropped);
- ``ignored_labels``: ``{label: count}`` of shapes with a label in ``label_map.ignore`` (dropped);
- ``rectangles_without_outline``: rectangles kept but unusable for mask training;
- ``source_labels``: the label list the file declared.
"""

from __future__ import annotations

import logging
import zipfile
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from wbc_core.data.coco import instances_files, read_coco
from wbc_core.data.cvat_xml import ANNOTATIONS_XML, open_zip, read_cvat_xml
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord
from wbc_core.labels import LabelMap

log = logging.getLogger(__name__)

CVAT_XML = "cvat_xml"
COCO = "coco"

# EXIF orientations that swap width and height (cv2.imread applies them; so does CVAT's frame size).
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


def _sniff_zip(path: Path) -> str:
    with open_zip(path) as zf:
        try:
            names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{path}: cannot list the archive ({exc}); export the task again") from exc
    if ANNOTATIONS_XML in names:
        return CVAT_XML
    if any(n.lower().endswith(".json") for n in names):
        return COCO
    raise DatasetError(f"{path}: the zip holds neither {ANNOTATIONS_XML} (CVAT for images 1.1) nor an "
                       "instances JSON (COCO 1.0); export the task in one of those formats")


def _sniff_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return CVAT_XML
    if suffix == ".json":
        return COCO
    with path.open("rb") as fh:
        head = fh.read(256).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return CVAT_XML
    if head.startswith(b"{"):
        return COCO
    raise DatasetError(f"{path}: neither XML nor JSON; pass a CVAT for images 1.1 or COCO 1.0 export")


def sniff_format(path: str | Path) -> str:
    """``"cvat_xml"`` or ``"coco"`` for an export file, folder or zip; DatasetError otherwise."""
    path = Path(path)
    if path.is_dir():
        if (path / ANNOTATIONS_XML).is_file():
            return CVAT_XML
        if instances_files(path):
            return COCO
        raise DatasetError(f"{path}: folder has neither {ANNOTATIONS_XML} nor annotations/instances_*.json; "
                           "point at a CVAT for images 1.1 or COCO 1.0 export")
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return _sniff_zip(path)
    return _sniff_file(path)


def read_any(path: str | Path, images_dir: Path | None = None,
             extract_dir: Path | None = None) -> AnnotatedDataset:
    """Read an export in whichever supported format it is, without touching labels.

    A zip is extracted into ``extract_dir`` (default: a new temporary folder).
    """
    fmt = sniff_format(path)
    reader = read_cvat_xml if fmt == CVAT_XML else read_coco
    return reader(Path(path), images_dir, extract_dir)


def apply_label_map(dataset: AnnotatedDataset, label_map: LabelMap, strict: bool = False) -> AnnotatedDataset:
    """Rename labels to model classes (aliases), drop ignored labels silently and unknown ones with a
    warning (or raise DatasetError when ``strict``). Modifies and returns ``dataset``."""
    unknown: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    for image in dataset.images:
        kept = []
        for inst in image.instances:
            name = label_map.class_of(inst.label)
            if name is not None:
                inst.label = name
                kept.append(inst)
            elif inst.label in label_map.ignore:
                ignored[inst.label] += 1
            else:
                unknown[inst.label] += 1
        image.instances = kept
    if unknown:
        listing = ", ".join(f"{label!r} ({n})" for label, n in unknown.most_common())
        message = (f"{dataset.source}: labels not in the label map: {listing}; add them to 'classes', "
                   "'aliases' or 'ignore' in the label map")
        if strict:
            raise DatasetError(message)
        log.warning("%s; these shapes are skipped", message)
    dataset.meta["source_labels"] = list(dataset.labels)
    dataset.meta["skipped_labels"] = dict(unknown)
    dataset.meta["ignored_labels"] = dict(ignored)
    dataset.labels = list(label_map.classes)
    return dataset


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block does not make the pixels unreadable
        orientation = None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def image_problem(image: ImageRecord) -> str | None:
    """Why ``image``'s file is unusable (missing, unreadable, other size), or None if it is fine."""
    if image.path is None or not Path(image.path).is_file():
        return f"{image.path or image.name}: image file not found"
    try:
        with Image.open(image.path) as im:
            im.verify()  # must come straight after open; the image is unusable afterwards
        with Image.open(image.path) as im:
            size = _oriented_size(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError) as exc:
        return f"{image.path}: not a readable image ({exc})"
    if size != (image.width, image.height):
        return (f"{image.path}: image is {size[0]}x{size[1]} but the annotations say "
                f"{image.width}x{image.height}")
    return None


def validate_images(dataset: AnnotatedDataset) -> None:
    """Check every frame's file exists, opens as an image and has the declared size.

    Reads only headers (no full decode). All problems are collected and raised in one DatasetError.
    """
    problems = [p for p in (image_problem(img) for img in dataset.images) if p]
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        dirs = dataset.meta.get("image_dirs")
        if dirs and any(img.path is None for img in dataset.images):
            more += f"\n(frame files were looked up in: {', '.join(str(d) for d in dirs)})"
        raise DatasetError(f"{dataset.source}: {len(problems)} of {len(dataset.images)} images are "
                           f"unusable:\n  {shown}{more}\nExport the task with images ('save images') or "
                           "pass the image folder.")


def load_dataset(path: str | Path, label_map: LabelMap | None = None, require_images: bool = False,
                 strict: bool = False, images_dir: Path | None = None,
                 extract_dir: Path | None = None) -> AnnotatedDataset:
    """Read any supported export, apply ``label_map`` and (with ``require_images``) check the images.

    ``strict`` turns labels the map does not know into a DatasetError instead of a warning;
    ``images_dir`` overrides where frames are looked up; a zip is extracted into ``extract_dir``
    (default: a new temporary folder). See the module docstring for the report in ``dataset.meta``.
    """
    dataset = read_any(path, images_dir, extract_dir)
    if label_map is not None:
        apply_label_map(dataset, label_map, strict=strict)
    else:
        dataset.meta.setdefault("skipped_labels", {})
        dataset.meta.setdefault("ignored_labels", {})
    boxes_only = sum(1 for img in dataset.images for inst in img.instances if not inst.has_outline)
    dataset.meta["rectangles_without_outline"] = boxes_only
    if boxes_only:
        log.warning("%s: %d rectangles have no outline; they cannot be used to train masks", dataset.source,
                    boxes_only)
    if require_images:
        validate_images(dataset)
    counts = dataset.label_counts()
    log.info("%s: %d frames, %d shapes %s", dataset.source, len(dataset), sum(counts.values()), counts)
    return dataset


def merge_datasets(parts: list[AnnotatedDataset]) -> AnnotatedDataset:
    """Several datasets as one (frames in order, labels in first-seen order)."""
    if len(parts) == 1:
        return parts[0]
    images = [img for part in parts for img in part.images]
    labels = list(dict.fromkeys(lbl for part in parts for lbl in part.labels))
    return AnnotatedDataset(images=images, labels=labels, source=" + ".join(p.source for p in parts))
