"""Helpers for tests that use the CVAT stand-in: the capture session's state and the capture files."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from tests.cvat_standin import StandinCVAT, synthetic_slide_jpeg

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAPTURES = SHARED / "reference" / "cvat-2.23.1-captures"
RVPBS = SHARED / "data" / "rvpbs-annotations"
REAL_HOST = "http://127.0.0.1:8080"

FRAME_NAMES = ["IMG_2783.jpg", "IMG_2789.jpg", "IMG_2799.jpg", "IMG_2993.jpg", "IMG_2994.jpg", "IMG_2995.jpg"]
LABELS = [("band cell", "#33ddff", "polygon"), ("basophil", "#fa3253", "polygon"),
          ("blast cell", "#34d1b7", "polygon"), ("eosinophil", "#ff007c", "polygon"),
          ("lymphocyte", "#ff6037", "any"), ("monocyte", "#ddff33", "polygon"),
          ("neutrophil", "#b83df5", "mask"), ("promyelocyte", "#ffcc33", "polygon"),
          ("myelocyte", "#24b353", "polygon"), ("metamyelocyte", "#034257", "polygon")]
VIEWER = ("capture-viewer", "viewer-password")


def load_capture(name: str) -> dict[str, Any]:
    """One capture file by its number prefix (``"17"``) or full name."""
    matches = sorted(CAPTURES.glob(f"{name}*.json"))
    if len(matches) != 1:
        raise FileNotFoundError(f"{CAPTURES}: expected one capture named {name}*, found {matches}")
    return json.loads(matches[0].read_text(encoding="utf-8"))


def capture_shapes() -> list[dict[str, Any]]:
    """The capture's six shapes (fixtures 10 and 11's request bodies) with the ids the server gave them."""
    shapes = [dict(s) for s in load_capture("10")["request"]["body"]["shapes"]]
    shapes += [dict(s) for s in load_capture("11")["request"]["body"]["shapes"]]
    for shape, sid in zip(shapes, range(43, 49), strict=True):
        shape["id"] = sid
    return shapes


@functools.lru_cache(maxsize=4)
def capture_frames(width: int = 1008, height: int = 756) -> list[tuple[str, bytes]]:
    by_frame: dict[int, list[np.ndarray]] = {}
    for shape in capture_shapes():
        if shape["type"] == "polygon":
            by_frame.setdefault(shape["frame"], []).append(np.asarray(shape["points"]).reshape(-1, 2))
    return [(name, synthetic_slide_jpeg(width, height, by_frame.get(i), seed=i)) for i, name in
            enumerate(FRAME_NAMES)]


@functools.lru_cache(maxsize=16)
def small_jpeg(seed: int, width: int = 320, height: int = 240) -> bytes:
    return synthetic_slide_jpeg(width, height, seed=seed)


def setup_capture_session(cvat: StandinCVAT, *, with_shapes: bool = True, with_viewer: bool = True) -> None:
    """The capture server's state: smoke task 1, task 18 (6 frames, labels 114-123, jobs 22/23), project 6
    with task 19 (2 frames 320x240, labels 124-133), and the non-admin ``capture-viewer``.

    ``with_shapes=False`` stops before fixture 10 (no shapes, both jobs ``new``; the next shape id is 43), so
    the write captures 10-14 can be replayed.
    """
    cvat.add_task("smoke", frames=[(f"smoke_{i}.jpg", small_jpeg(50 + i)) for i in range(2)],
                  labels=[{"name": "cell", "type": "any", "id": 1}], id=1, segment_size=2, job_ids=[1],
                  image_quality=90, data_id=1)
    cvat.add_task("capture-rvpbs", frames=capture_frames(),
                  labels=[{"name": n, "color": c, "type": t, "id": 114 + i} for i, (n, c, t) in enumerate(LABELS)],
                  id=18, segment_size=3, job_ids=[22, 23], image_quality=70, data_id=17)
    if with_shapes:
        shapes = capture_shapes()
        cvat.set_annotations(18, shapes[:5])
        cvat.add_shapes(18, shapes[5:])
        cvat.set_job_state(22, state="completed")
        cvat.set_job_state(22, stage="acceptance", state="completed")
        cvat.set_job_state(23, state="in progress")
    else:
        cvat.add_shapes(18, [{"type": "rectangle", "frame": 0, "label_id": 114, "points": [0, 0, 1, 1], "id": 42}])
        cvat.delete_shapes(18, [42])
    project_labels = [{"name": n, "color": c, "type": "any" if n == "neutrophil" else t, "id": 124 + i}
                      for i, (n, c, t) in enumerate(LABELS)]
    cvat.add_project("capture-rvpbs-project", labels=project_labels, id=6)
    cvat.add_task("capture-rvpbs-in-project", frames=[(f"in_project_{i}.jpg", small_jpeg(9 + i)) for i in range(2)],
                  project_id=6, id=19, job_ids=[24], data_id=18)
    if with_viewer:
        cvat.add_user(*VIEWER, email="capture-viewer@example.com", first_name="Capture", last_name="Viewer")


DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
VOLATILE = {"created_date", "updated_date", "date_joined", "last_login", "started_date", "finished_date",
            "expiry_date", "chunks_updated_date", "key"}


def compare_json(expected: Any, actual: Any, host: str, where: str = "$", volatile: set[str] = VOLATILE,
                 key: str | None = None) -> list[str]:
    """Differences between a captured JSON body and the stand-in's: same keys in the same order, same value
    types, equal values except dates (format only) and secrets; URLs compared with the host swapped."""
    problems: list[str] = []
    if key in volatile:
        if isinstance(expected, str) and key != "key" and not (isinstance(actual, str) and DATE_RE.match(actual)):
            problems.append(f"{where}: {actual!r} is not a CVAT date")
        elif (expected is None) != (actual is None):
            problems.append(f"{where}: expected {expected!r}, got {actual!r}")
        return problems
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {type(actual).__name__}"]
        if list(expected) != list(actual):
            problems.append(f"{where}: keys {list(actual)} != captured {list(expected)}")
        for k in expected:
            if k in actual:
                problems += compare_json(expected[k], actual[k], host, f"{where}.{k}", volatile, k)
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {type(actual).__name__}"]
        if len(expected) != len(actual):
            return [f"{where}: {len(actual)} items, captured {len(expected)}"]
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            problems += compare_json(e, a, host, f"{where}[{i}]", volatile, key)
        return problems
    if type(expected) is not type(actual):
        return [f"{where}: {actual!r} ({type(actual).__name__}) vs captured {expected!r} ({type(expected).__name__})"]
    if isinstance(expected, str):
        expected = expected.replace(REAL_HOST, host)
    if expected != actual:
        problems.append(f"{where}: {actual!r} != captured {expected!r}")
    return problems
