"""The one in-memory representation every dataset reader produces.

CVAT XML, COCO JSON, ``cvat_sync`` output, the synthetic generator and the BCCD
benchmark loader all become an :class:`AnnotatedDataset`: a list of
:class:`ImageRecord` (one per frame) holding :class:`Instance` objects (one per
cell). Geometry is kept in the frame's native pixel coordinates and in its
compact source form (polygon, or a mask crop); full-size masks are only made on
demand by :meth:`Instance.to_mask`, so a dataset of 4032x3024 slides costs a few
kilobytes per cell in memory, not 12 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wbc_core.data import masks as mask_ops

#: The largest frame (in pixels) a dataset or a pull accepts: PIL refuses to open bigger images as decompression
#: bombs (2 x ``Image.MAX_IMAGE_PIXELS``), and a mask the size of such a frame is ~180 MB, not a machine's memory.
MAX_FRAME_PIXELS = 2 * 89_478_485


class DatasetError(ValueError):
    """A dataset cannot be read. The message names the file and what to fix."""


def check_frame_size(width: int, height: int, where: str) -> None:
    """A frame size a dataset may declare: positive, and at most :data:`MAX_FRAME_PIXELS` (a hostile or broken
    export declaring a 100000 x 100000 frame would make every mask of it 10 GB)."""
    if width <= 0 or height <= 0:
        raise DatasetError(f"{where}: frame size {width}x{height} is not positive")
    if width * height > MAX_FRAME_PIXELS:
        raise DatasetError(f"{where}: frame size {width}x{height} is over {MAX_FRAME_PIXELS} pixels, larger than "
                           "any image this tool opens; the export is broken or not what it claims")


UNEDITED_SOURCE = "auto"
"""CVAT's ``source`` of a shape the function created and nobody touched since: any edit of its outline or label in
CVAT's UI makes it ``semi-auto``, a shape drawn by hand is ``manual`` (cvat-core ``computeNewSource``). Its outline
is the serving model's own, not the expert's: the retrain gate does not score outlines on it and the fine-tune
does not learn outlines from it."""


@dataclass
class Instance:
    """One annotated cell.

    Exactly one of ``polygon`` (float array ``(N, 2)`` of x, y in native pixels),
    ``mask_crop`` (bool array ``(h, w)`` placed at ``mask_origin`` = (left, top)),
    or neither (a rectangle-only shape, ``box`` set) describes its outline.
    ``box`` is ``(xtl, ytl, xbr, ybr)`` in native pixels (float, exclusive of
    nothing: the tight extent of the outline). It is filled in from the outline
    when not given.
    """

    label: str
    polygon: np.ndarray | None = None
    mask_crop: np.ndarray | None = None
    mask_origin: tuple[int, int] = (0, 0)
    box: tuple[float, float, float, float] | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    occluded: bool = False
    source: str = "manual"
    score: float | None = None

    def __post_init__(self) -> None:
        if self.polygon is not None:
            self.polygon = np.asarray(self.polygon, dtype=np.float64).reshape(-1, 2)
        if self.mask_crop is not None:
            self.mask_crop = np.asarray(self.mask_crop, dtype=bool)
        if self.box is None:
            self.box = self._outline_box()

    @property
    def kind(self) -> str:
        """``polygon``, ``mask`` or ``rectangle`` (the CVAT shape type)."""
        if self.polygon is not None:
            return "polygon"
        if self.mask_crop is not None:
            return "mask"
        return "rectangle"

    @property
    def has_outline(self) -> bool:
        return self.kind != "rectangle"

    def _outline_box(self) -> tuple[float, float, float, float] | None:
        if self.polygon is not None and len(self.polygon):
            x0, y0 = self.polygon.min(axis=0)
            x1, y1 = self.polygon.max(axis=0)
            return float(x0), float(y0), float(x1), float(y1)
        if self.mask_crop is not None and self.mask_crop.any():
            ys, xs = np.nonzero(self.mask_crop)
            left, top = self.mask_origin
            return (float(left + xs.min()), float(top + ys.min()),
                    float(left + xs.max() + 1), float(top + ys.max() + 1))
        return None

    def to_mask(self, height: int, width: int, scale: float = 1.0) -> np.ndarray:
        """Binary mask ``(round(height*scale), round(width*scale))`` of this cell.

        ``height``/``width`` are the frame's native size. ``scale`` < 1 renders
        directly at a reduced size (polygons are rasterised at that size, mask
        crops are resized), which is what training and inference at ~1024 px use.
        """
        out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
        if self.polygon is not None:
            return mask_ops.polygon_to_mask(self.polygon * scale, out_h, out_w)
        if self.mask_crop is not None:
            return mask_ops.place_crop(self.mask_crop, self.mask_origin, height, width, scale)
        if self.box is not None:
            raise DatasetError(f"{self.label!r} is a rectangle with no outline; it has no mask")
        raise DatasetError(f"{self.label!r} has no geometry")


@dataclass
class ImageRecord:
    """One frame: its file (may be absent for annotation-only exports) and cells."""

    name: str
    width: int
    height: int
    path: Path | None = None
    instances: list[Instance] = field(default_factory=list)
    frame_id: int | None = None

    def outlined(self) -> list[Instance]:
        return [inst for inst in self.instances if inst.has_outline]


@dataclass
class AnnotatedDataset:
    """Frames plus the label list the source declared (in its order)."""

    images: list[ImageRecord]
    labels: list[str]
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for image in self.images:
            for inst in image.instances:
                counts[inst.label] = counts.get(inst.label, 0) + 1
        return counts
