"""Synthetic smear pictures for the classifier tests (helpers), and a check that they are what they claim.

Two cell types that differ in shape only: ``lymphocyte`` (one round nucleus) and ``neutrophil`` (three
small lobes). Two "domains" differ in colour, background and focus, like PBC vs BCCD.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from wbc_core.data.types import AnnotatedDataset, ImageRecord, Instance

DOMAINS = {
    # background, red cells, cytoplasm, nucleus (RGB), blur sigma
    "source": ((250, 228, 200), (215, 160, 165), (205, 185, 215), (80, 40, 120), 0.0),
    "target": ((205, 215, 225), (200, 150, 140), (200, 190, 225), (100, 90, 200), 1.5),
}


def draw_cell(canvas: np.ndarray, cx: int, cy: int, radius: int, kind: str, domain: str,
              rng: np.random.Generator) -> np.ndarray:
    """Draw one WBC; returns its bool mask."""
    _, _, cyto, nucleus, _ = DOMAINS[domain]
    mask = np.zeros(canvas.shape[:2], np.uint8)
    cv2.circle(mask, (cx, cy), radius, 1, -1)
    canvas[mask > 0] = cyto
    if kind == "lymphocyte":
        cv2.circle(canvas, (cx, cy), int(radius * 0.75), nucleus, -1)
    else:
        start = rng.uniform(0, 2 * np.pi)
        for j in range(3):
            a = start + j * 2 * np.pi / 3
            lobe = (int(cx + 0.45 * radius * np.cos(a)), int(cy + 0.45 * radius * np.sin(a)))
            cv2.circle(canvas, lobe, int(radius * 0.28), nucleus, -1)
    return mask > 0


def smear(kind: str, domain: str, size: tuple[int, int], cell_radius: int, seed: int,
          centre: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, bool mask of its one WBC): background, red cells and one WBC of ``kind``."""
    rng = np.random.default_rng(seed)
    h, w = size
    bg, rbc, _, _, blur = DOMAINS[domain]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    for _ in range(int(h * w / (cell_radius * cell_radius * 6))):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(cell_radius * 0.6), rbc, -1)
    cx, cy = centre or (w // 2 + int(rng.integers(-4, 5)), h // 2 + int(rng.integers(-4, 5)))
    mask = draw_cell(img, cx, cy, int(cell_radius * rng.uniform(0.9, 1.1)), kind, domain, rng)
    if blur:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), mask


def write_class_folders(root: Path, per_class: int = 12, size: int = 120, seed: int = 0) -> Path:
    """A PBC-style source: ``lymphocyte/LY_<n>.jpg`` and ``neutrophil/SNE_<n>.jpg`` single-cell images."""
    for k, (folder, prefix, kind) in enumerate((("lymphocyte", "LY", "lymphocyte"),
                                                ("neutrophil", "SNE", "neutrophil"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, _ = smear(kind, "source", (size, size), size // 6, seed=seed * 1000 + k * 100 + i)
            cv2.imwrite(str(root / folder / f"{prefix}_{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root


def target_dataset(root: Path, per_class: int = 12, size: tuple[int, int] = (160, 200), seed: int = 1
                   ) -> AnnotatedDataset:
    """Target frames (PNG files) with one labelled, mask-outlined WBC each, as the loaders produce them."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for k, kind in enumerate(("lymphocyte", "neutrophil")):
        for i in range(per_class):
            img, mask = smear(kind, "target", size, 22, seed=seed * 1000 + k * 100 + i)
            name = f"{kind}_{i:03d}.png"
            cv2.imwrite(str(root / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            ys, xs = np.nonzero(mask)
            crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            inst = Instance(label=kind, mask_crop=crop, mask_origin=(int(xs.min()), int(ys.min())))
            records.append(ImageRecord(name=name, width=size[1], height=size[0], path=root / name,
                                       instances=[inst]))
    return AnnotatedDataset(images=records, labels=["lymphocyte", "neutrophil"], source=str(root))


def test_synthetic_cells_are_where_their_masks_say() -> None:
    img, mask = smear("neutrophil", "source", (120, 120), 20, seed=3)
    assert img.shape == (120, 120, 3) and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 60) < 6 and abs(ys.mean() - 60) < 6
    assert 0.7 < mask.sum() / (np.pi * 20 ** 2) < 1.3
    # the nucleus is darker than the cytoplasm, which differs from the background
    assert img[mask].mean() < img[~mask].mean()
