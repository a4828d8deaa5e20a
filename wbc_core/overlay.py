"""Overlay pictures: ground truth and predictions drawn on the slide, for people to look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from wbc_core.data.images import read_rgb, resize_to
from wbc_core.data.types import Instance

GT_COLOUR = (40, 220, 40)
PRED_COLOUR = (230, 40, 230)


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def draw_overlay(image: np.ndarray | str | Path, gt: Sequence[Instance], cells: Sequence, width: int, height: int,
                 max_side: int = 1024) -> np.ndarray:
    """RGB picture at most ``max_side`` px: ground-truth outlines (green), predicted masks (magenta,
    filled lightly) with label and score."""
    if not isinstance(image, np.ndarray):
        image, _ = read_rgb(image, min_long_side=max_side)
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = round(width * scale), round(height * scale)
    canvas = resize_to(image, out_w, out_h).copy()
    thick = max(2, round(out_w / 400))
    tint = canvas.copy()
    for cell in cells:
        m = cv2.resize(cell.full_mask(height, width).astype(np.uint8), (out_w, out_h),
                       interpolation=cv2.INTER_NEAREST)
        tint[m > 0] = PRED_COLOUR
        cv2.drawContours(canvas, _contours(m), -1, PRED_COLOUR, thick)
    canvas = cv2.addWeighted(tint, 0.25, canvas, 0.75, 0)
    for inst in gt:
        m = inst.to_mask(height, width, scale=scale)
        if m.shape != (out_h, out_w):
            m = cv2.resize(m.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        cv2.drawContours(canvas, _contours(m), -1, GT_COLOUR, thick)
    font_scale = max(0.4, out_w / 1600)
    for cell in cells:
        x0, y0 = int(cell.box[0] * scale), int(cell.box[1] * scale)
        text = f"{cell.label} {cell.score:.2f}"
        cv2.putText(canvas, text, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    thick + 1, cv2.LINE_AA)
        cv2.putText(canvas, text, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, font_scale, PRED_COLOUR,
                    max(1, thick - 1), cv2.LINE_AA)
    return canvas


def save_png(image_rgb: np.ndarray, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
    tmp.replace(path)
