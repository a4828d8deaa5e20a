"""How typical each frame's cells are among a task's cells: the density term of the active-learning ranking.

With a few dozen corrected frames (where a lab starts), uncertainty alone picks outliers: the cells the model
is least sure of are often the odd ones (a torn cell, a smudge, two cells touching), and a fine-tune on them
teaches little that holds for the rest. On BCCD the first ten frames ranked by uncertainty alone held the most
atypical cell of the pool and made the held-back frames worse. Low-budget active learning therefore weighs
uncertainty by density (Settles & Craven 2008, "information density"; Hacohen et al. 2022, TypiClust: at small
budgets, typical examples first):

    score = uncertainty x typicality ** density_power

- A cell's **embedding** is what the mask head saw when it drew the outline: its features averaged over the
  cell (:attr:`wbc_core.detect.Cell.embedding`), computed by ``detect`` anyway.
- A cell's **typicality** is TypiClust's: 1 / the mean distance to its ``k`` nearest cells among all the
  cells of the frames being ranked (features standardised), divided by the largest, so it lies in (0, 1].
- A frame's typicality is the mean of its cells'. A frame without cells gives no evidence either way: it gets
  the median of the frames that have cells (1 when none has).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Nearest neighbours a cell's typicality is measured over (TypiClust's choice).
NEIGHBOURS = 20
#: How much typicality counts against uncertainty in ``cvat_sync rank``'s score (0: uncertainty only).
#: 2, not the textbook 1: on the BCCD pool (205 frames) the top 10 frames then hold as many rough outlines
#: (7) and one false or missed cell, and their cells are as typical as the pool's most typical quarter.
DENSITY_POWER = 2.0


def cell_typicality(embeddings: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Typicality in (0, 1] of each row of ``embeddings`` (N x C) among all rows; all 1 with fewer than 3 rows."""
    x = np.asarray(embeddings, np.float64)
    n = len(x)
    if n < 3:
        return np.ones(n)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    sq = (x * x).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))
    k = min(k, n - 1)
    nearest = np.sort(dist, axis=1)[:, 1:k + 1].mean(axis=1)  # column 0 is the cell itself
    typ = 1.0 / np.maximum(nearest, 1e-9)
    return typ / typ.max()


def frame_typicality(cell_embeddings: Sequence[Sequence[np.ndarray]], k: int = NEIGHBOURS) -> list[float]:
    """Each frame's typicality (the mean of its cells'), given every frame's cell embeddings; frames without
    cells get the median of the others (1 when no frame has cells)."""
    owners = [i for i, cells in enumerate(cell_embeddings) for _ in cells]
    if not owners:
        return [1.0] * len(cell_embeddings)
    typ = cell_typicality(np.stack([np.asarray(e) for cells in cell_embeddings for e in cells]), k)
    sums = np.zeros(len(cell_embeddings))
    counts = np.zeros(len(cell_embeddings))
    np.add.at(sums, owners, typ)
    np.add.at(counts, owners, 1)
    has = counts > 0
    out = np.zeros(len(cell_embeddings))
    out[has] = sums[has] / counts[has]
    out[~has] = float(np.median(out[has]))
    return [round(float(v), 4) for v in out]
