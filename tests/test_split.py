"""The retrain split rule shared by ``trainer retrain`` and ``cvat_sync rank`` (wbc_core/split.py)."""

from __future__ import annotations

import hashlib

import pytest

from wbc_core.split import SALT, VAL, VAL_FRACTION, split_side, validation_slots


def test_the_side_depends_on_content_salt_and_fraction_only() -> None:
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    sides = [split_side(k) for k in keys]
    assert sides == [split_side(k, SALT, VAL_FRACTION) for k in keys]  # the defaults are retrain's
    share = sides.count(VAL) / len(keys)
    assert abs(share - VAL_FRACTION) < 0.03
    assert [split_side(k, "other salt") for k in keys] != sides       # the salt reshuffles
    assert all(split_side(k, SALT, 0.0) == "train" for k in keys)
    # a larger fraction only moves frames from train to validation, never back
    assert all(split_side(k, SALT, 0.5) == VAL for k, s in zip(keys, sides, strict=True) if s == VAL)


@pytest.mark.parametrize(("k", "fraction", "slots"), [
    (10, 0.2, 2), (5, 0.2, 1), (3, 0.2, 1), (2, 0.2, 1), (1, 0.2, 0), (0, 0.2, 0), (10, 0.0, 0), (4, 0.9, 3)])
def test_validation_slots_leave_room_for_training_frames(k: int, fraction: float, slots: int) -> None:
    assert validation_slots(k, fraction) == slots
