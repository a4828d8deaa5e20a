"""Hostile requests and hostile servers (issue 13): what the product refuses, and what the worst case costs.

Three parts, each recorded in ``benchmarks/results/hostile.json``:

- **function corpus**: every case of ``tests/hostile_images.bad_requests`` (malformed JSON and base64,
  cut-off and non-images, decompression bombs, 16-bit/float images that declare more decode memory than
  ``MAX_DECODE_BYTES``, bad thresholds, JSON nested 100,000 deep) sent as an HTTP body through nuclio-sdk's
  deserializer to ``serverless/main.handler``, in one worker process: the status (400 expected), whether the
  message names the problem, and whether the worker still annotates a good slide afterwards.
- **worst accepted images**: the largest images the function accepts (just under the decode budget: a 16-bit
  grey PNG, an 8-bit RGB PNG, a 4032x3024 slide JPEG), each in a fresh worker process: peak RSS (the
  process's own ``ru_maxrss``) and RSS after start-up. ``function.yaml``'s memory limit is sized from these.
- **largest response**: a hostile model that returns ``DEFAULT_MAX_CELLS`` overlapping 1300 px cells on a
  4032x3024 slide, through the real encoder and the response budget (``MAX_RESPONSE_BYTES``): the body size.
- **test corpus**: the hostile test files (``tests/test_hostile_sync.py`` for ``cvat_sync`` against a hostile
  CVAT stand-in, the function's bad-input and bound tests, the trainer's export reader's name and zip-bomb
  tests) run by pytest; cases tried and passed.

    python benchmarks/hostile.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from latency import rss_mb, run_child, synthetic_slides  # noqa: E402  (one child-process runner for the benchmarks)

log = logging.getLogger("hostile")

#: The hostile test files and the test names (pytest -k) that make up the corpus.
TEST_FILES = ["tests/test_hostile_sync.py", "tests/test_serverless.py", "tests/test_cvat_xml.py"]
TEST_SELECT = "hostile or bad_input or budget or decode_memory or outside or zip_bomb"


def _worker(bundle: str) -> tuple[Any, Any]:
    os.environ["WBC_BUNDLE_DIR"] = bundle
    os.environ.setdefault("WBC_NUM_THREADS", "2")
    from serverless import main as function
    from serverless.__main__ import make_context

    context = make_context(logging.ERROR)
    function.init_context(context)
    return function, context


def _slide_jpeg() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return synthetic_slides(Path(tmp), 1)[0].read_bytes()


def _corpus_child(queue: Any, bundle: str) -> None:
    """All function corpus cases in one worker, each followed by a good request."""
    try:
        from serverless.__main__ import build_event, request_body
        from tests.hostile_images import bad_requests, encode, small_slide

        function, context = _worker(bundle)
        good = _slide_jpeg()
        small_jpeg = encode(small_slide(), "JPEG", quality=90)
        cases = []
        for name, (body, word) in bad_requests(small_jpeg, small_slide()).items():
            raw = body if isinstance(body, bytes) else (b"" if body is None else (
                body.encode() if isinstance(body, str) else json.dumps(body).encode()))
            t0 = time.perf_counter()
            response = function.handler(context, build_event(raw))
            seconds = time.perf_counter() - t0
            message = json.loads(response.body).get("error", "") if response.status_code != 200 else ""
            alive = function.handler(context, build_event(request_body(good, None))).status_code == 200
            cases.append({"case": name, "status": response.status_code, "expected_status": 400,
                          "message_names_it": word.lower() in message.lower(), "message": message[:300],
                          "worker_alive_after": alive, "seconds": round(seconds, 3), "body_bytes": len(raw),
                          "passed": response.status_code == 400 and word.lower() in message.lower() and alive})
        queue.put({"cases": cases, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def worst_image(kind: str, folder: Path) -> tuple[Path, str, tuple[int, int]]:
    """The request body file of one accepted worst-case image (made here, in the parent, so that the worker's
    peak RSS is the request's alone), its PIL mode and size."""
    from PIL import Image

    from serverless.__main__ import request_body
    from serverless.model_handler import MAX_DECODE_BYTES
    from wbc_core.data.images import decode_memory_bytes

    if kind.startswith("slide JPEG"):
        data, mode, size = _slide_jpeg(), "RGB", (4032, 3024)
    else:
        mode = "I;16" if kind.startswith("16-bit") else "RGB"
        per_px = decode_memory_bytes("PNG", mode, 1000, 1000) / 1e6
        side = int((MAX_DECODE_BYTES * 0.98 / per_px) ** 0.5)  # just inside the decode budget
        size = (side, side)
        rng = np.random.default_rng(0)
        if mode == "I;16":
            pixels = np.full((side, side), 30000, np.uint16)
            pixels[::97] = rng.integers(0, 65535, (len(pixels[::97]), side), dtype=np.uint16)
        else:
            pixels = np.full((side, side, 3), 220, np.uint8)
            pixels[::97] = rng.integers(0, 255, (len(pixels[::97]), side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
        data = buf.getvalue()
    path = folder / f"{kind.split()[0]}.json"
    path.write_bytes(request_body(data, None))
    return path, mode, size


def _image_child(queue: Any, bundle: str, kind: str, body_file: str, mode: str, size: tuple[int, int]) -> None:
    """One accepted worst-case image in a fresh worker: its peak RSS."""
    try:
        from serverless.__main__ import build_event
        from wbc_core.data.images import decode_memory_bytes

        function, context = _worker(bundle)
        after_init = rss_mb()
        need = decode_memory_bytes("JPEG" if kind.startswith("slide") else "PNG", mode, *size,
                                   context.user_data.model.predictor.decode_side)
        body = Path(body_file).read_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        response = function.handler(context, build_event(body))
        seconds = time.perf_counter() - t0
        queue.put({"case": kind, "size": list(size), "mode": mode, "status": response.status_code,
                   "request_mb": round(len(body) / 2**20, 2), "decode_estimate_mb": round(need / 2**20, 1),
                   "rss_after_init_mb": round(after_init, 1), "peak_rss_before_request_mb": round(before, 1),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "seconds": round(seconds, 2)})
    except BaseException as exc:
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def _response_child(queue: Any, bundle: str) -> None:
    """A hostile model: DEFAULT_MAX_CELLS overlapping 1300 px cells on a 4032x3024 slide."""
    try:
        import cv2

        from serverless.__main__ import build_event, request_body
        from wbc_core.contract import DEFAULT_MAX_CELLS, MAX_RESPONSE_BYTES
        from wbc_core.data.masks import mask_to_polygon
        from wbc_core.detect import Cell, Detection

        function, context = _worker(bundle)
        handler = context.user_data.model
        disc = np.zeros((1300, 1300), np.uint8)
        cv2.circle(disc, (650, 650), 649, 1, -1)
        disc = disc.astype(bool)
        rng = np.random.default_rng(0)
        label = handler.predictor.classes[0]

        def hostile_detect(data: bytes, threshold: float | None = None) -> Detection:
            cells = []
            for i in range(DEFAULT_MAX_CELLS):
                x, y = int(rng.integers(0, 4032 - 1300)), int(rng.integers(0, 3024 - 1300))
                cell = Cell(label=label, score=1.0 - i / 1000, box=(x, y, x + 1300, y + 1300), mask_crop=disc,
                            origin=(x, y), attributes={"decided_by": "segmenter"})
                cell.points = mask_to_polygon(disc, offset=(x, y))
                cells.append(cell)
            return Detection(cells=cells, width=4032, height=3024, threshold=0.5, max_cells=DEFAULT_MAX_CELLS)

        handler.detect = hostile_detect
        response = function.handler(context, build_event(request_body(_slide_jpeg(), None)))
        returned = len(json.loads(response.body))
        queue.put({"cells_from_model": DEFAULT_MAX_CELLS, "cell_diameter_px": 1300, "status": response.status_code,
                   "cells_returned": returned, "body_mb": round(len(response.body.encode()) / 2**20, 1),
                   "budget_mb": MAX_RESPONSE_BYTES / 2**20,
                   "unbounded_body_mb_estimate": round(DEFAULT_MAX_CELLS * 1300 * 1300 * 4 / 2**20, 1)})
    except BaseException as exc:
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def run_tests(junit: Path) -> dict:
    """The hostile test corpus through pytest; counts per file from its JUnit XML."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, "-k", TEST_SELECT,
           f"--junitxml={junit}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    out: dict[str, Any] = {"command": shlex.join(["python", *cmd[1:-1]]), "exit_code": proc.returncode,
                           "seconds": round(time.perf_counter() - t0, 1), "files": {}}
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = case.get("classname", "").split(".")[-1]
        entry = out["files"].setdefault(name, {"tried": 0, "passed": 0, "failed": []})
        entry["tried"] += 1
        if any(child.tag in ("failure", "error") for child in case):
            entry["failed"].append(case.get("name"))
        elif not any(child.tag == "skipped" for child in case):
            entry["passed"] += 1
    out["tried"] = sum(f["tried"] for f in out["files"].values())
    out["passed"] = sum(f["passed"] for f in out["files"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle served (default: the shipped starter)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for hostile.json")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the pytest corpus")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from wbc_core.bundle import default_bundle_dir

    bundle = str((args.bundle or default_bundle_dir()).resolve())
    result: dict[str, Any] = {"bundle": os.path.relpath(bundle, REPO)}
    log.info("function corpus (one worker)")
    corpus = run_child(_corpus_child, bundle)
    result["function_cases"] = corpus["cases"]
    result["function_corpus_peak_rss_mb"] = round(corpus["peak_rss_mb"], 1)
    images = []
    for kind in ("slide JPEG 4032x3024", "8-bit RGB PNG at the decode budget", "16-bit grey PNG at the decode budget"):
        log.info("worst accepted image: %s (fresh worker)", kind)
        with tempfile.TemporaryDirectory() as tmp:
            body_file, mode, size = worst_image(kind, Path(tmp))
            images.append(run_child(_image_child, bundle, kind, str(body_file), mode, size))
        log.info("  %s", images[-1])
    result["accepted_images"] = images
    worst = max(images, key=lambda r: r["peak_rss_mb"])
    result["worst_image"] = {"case": worst["case"], "peak_rss_mb": worst["peak_rss_mb"]}
    log.info("largest response (hostile model)")
    result["largest_response"] = run_child(_response_child, bundle)
    log.info("  %s", result["largest_response"])
    from serverless.model_handler import MAX_DECODE_BYTES

    result["max_decode_mb"] = MAX_DECODE_BYTES / 2**20
    import yaml

    spec = yaml.safe_load((REPO / "function.yaml").read_text())["spec"]
    result["function_yaml_memory_limit"] = spec.get("resources", {}).get("limits", {}).get("memory")
    function_passed = sum(c["passed"] for c in corpus["cases"])
    result["function_corpus"] = {"tried": len(corpus["cases"]), "passed": function_passed}
    if not args.skip_tests:
        log.info("test corpus (pytest)")
        with tempfile.TemporaryDirectory() as tmp:
            result["test_corpus"] = run_tests(Path(tmp) / "junit.xml")
        log.info("  %s", {k: v for k, v in result["test_corpus"].items() if k != "files"})
    tests = result.get("test_corpus", {"tried": 0, "passed": 0})
    result["cases_tried"] = len(corpus["cases"]) + tests["tried"]
    result["cases_passed"] = function_passed + tests["passed"]
    result["command"] = "python benchmarks/hostile.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hostile.json").write_text(json.dumps(result, indent=1))
    log.info("cases passed %d / %d; worst image %s: peak RSS %.0f MB; largest response %.1f MB -> %s",
             result["cases_passed"], result["cases_tried"], worst["case"], worst["peak_rss_mb"],
             result["largest_response"]["body_mb"], args.out / "hostile.json")
    return 0 if result["cases_passed"] == result["cases_tried"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
