"""Which side of the retraining split a frame falls on: one rule for ``trainer retrain`` and ``cvat_sync rank``.

A frame's side is a pure function of its identity (the sha256 of its image bytes, as ``cvat_sync pull`` stores
them), a salt and the validation fraction, so a frame keeps its side across cycles, tasks and renames.
``trainer retrain`` splits the pulled frames with it; ``cvat_sync rank`` uses it to know, before the expert
corrects anything, which frames will be validation frames, so that the frames it queues include some (a
retrain refuses to gate, and the expert's corrections wait, while no validation frame exists).
"""

from __future__ import annotations

import hashlib

#: Share of frames held out for the promotion gate (``split.val_fraction`` in retrain.yaml).
VAL_FRACTION = 0.2
#: Changing the salt reshuffles every frame between train and validation: do it never, or on purpose.
SALT = "wbc-split-1"

TRAIN, VAL = "train", "val"


def split_side(key: str, salt: str = SALT, val_fraction: float = VAL_FRACTION) -> str:
    """``"val"`` or ``"train"`` for the frame whose identity (image sha256) is ``key``."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
    return VAL if u < val_fraction else TRAIN


def validation_slots(k: int, val_fraction: float) -> int:
    """How many of ``k`` queued frames go to validation-side frames: ``val_fraction`` of them, rounded, and at
    least one when ``k`` >= 2 and the fraction is above 0 (a retrain needs one to gate)."""
    if k <= 0 or val_fraction <= 0:
        return 0
    return min(k - 1, max(1, round(k * val_fraction))) if k >= 2 else 0
