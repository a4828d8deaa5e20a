"""Typicality: the density term that keeps the first corrections off outliers (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest

from wbc_core.typicality import cell_typicality, frame_typicality


def _cloud(seed: int = 0, n: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 8))


def test_the_centre_of_a_cloud_is_typical_and_an_outlier_is_not() -> None:
    cloud = _cloud()
    centre = np.zeros((1, 8))
    outlier = np.full((1, 8), 12.0)
    typ = cell_typicality(np.vstack([cloud, centre, outlier]), k=10)
    assert typ.max() == 1.0 and (typ > 0).all()
    assert typ[-1] == typ.min() and typ[-1] < 0.5 * np.median(typ)
    assert typ[-2] > np.median(typ[:-2])  # the centre is among the most typical
    # the features are standardised: scaling one of them changes nothing
    scaled = np.vstack([cloud, centre, outlier]) * np.array([1000.0] + [1.0] * 7)
    np.testing.assert_allclose(cell_typicality(scaled, k=10), typ, rtol=1e-6)


def test_typicality_of_tiny_pools() -> None:
    assert cell_typicality(np.zeros((0, 4))).shape == (0,)
    np.testing.assert_array_equal(cell_typicality(np.ones((2, 4))), [1.0, 1.0])
    same = cell_typicality(np.ones((5, 4)))   # identical cells: all equally typical
    np.testing.assert_allclose(same, 1.0)
    assert cell_typicality(_cloud(n=5), k=20).shape == (5,)   # k larger than the pool: every other cell


def test_a_frame_is_as_typical_as_its_cells_and_an_empty_one_gets_the_median() -> None:
    cloud = _cloud(1)
    frames = [[cloud[i] for i in range(0, 10)], [cloud[i] for i in range(10, 38)], [], [np.full(8, 15.0)],
              [cloud[38], cloud[39]]]
    typ = frame_typicality(frames, k=10)
    cells = cell_typicality(np.vstack([cloud[:38], np.full((1, 8), 15.0), cloud[38:]]), k=10)
    assert typ[0] == pytest.approx(cells[:10].mean(), abs=1e-4)
    assert typ[3] == pytest.approx(cells[38], abs=1e-4) and typ[3] == min(typ)   # the outlier's frame
    assert typ[2] == pytest.approx(float(np.median([typ[0], typ[1], typ[3], typ[4]])), abs=1e-4)
    assert frame_typicality([[], []]) == [1.0, 1.0] and frame_typicality([]) == []
