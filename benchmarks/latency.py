"""End-to-end latency of the CVAT function on 4032x3024 slide photos, against torchvision's Mask R-CNN.

Every timed request goes the way CVAT sends it: a JSON body ``{"image": <base64 JPEG>}`` is turned into a
Nuclio event by nuclio-sdk's own deserializer and passed to ``serverless/main.handler`` with a real
nuclio-sdk Context; the clock stops when the JSON response body is ready. Each side runs in its own fresh
process (so peak RSS is that process's own), with the same thread count.

- **ours**: the model bundle given (default: the packaged CPU config's bundle you trained), through
  ``init_context``/``handler`` exactly as deployed, with function.yaml's WBC_NUM_THREADS. Stage times come
  from the handler (parse, decode, resize, model, masks, classify, polygons, encode); the floor is parse +
  decode + encode alone (what any function must pay). ``classifier`` in the JSON says whether the bundle had
  a crop classifier (its cost is the ``classify`` stage).
- **baseline**: ``torchvision.models.detection.maskrcnn_resnet50_fpn`` at its defaults (800/1333, the model
  a CVAT user would drop in) in a CVAT-style handler: full-size PIL decode, the model's own forward (masks
  pasted at full resolution), masks thresholded at 0.5, then the same CVAT encoding as ours. No weights can
  be downloaded here, so its weights are random (or ``--baseline-weights``); so that both sides return the
  same work, it is made to return exactly as many cells per slide as ours did (``detections_per_img``).
- **memory**: after the timed requests, 200 mixed good and bad requests (empty, non-JSON, no image, bad
  base64, non-image, truncated JPEG, 1x1, a decompression bomb, bad thresholds) go through the same worker;
  the RSS growth between request 20 and 200 is reported (target: under 10%).

Slides are synthetic Leishman-like 4032x3024 photos with camera noise (JPEG quality 92, 2.5-3 MB, like a
phone's), or your own with ``--images DIR``.

    python benchmarks/latency.py --bundle runs/default-cpu/run/bundle --out benchmarks/results

Writes ``latency_<device>.json`` and ``latency_<device>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("latency")

# issue 11: with a crop classifier in the bundle, at the default 1008x756 input, on 2 cores
TARGETS = {"cpu": {"p50_s": 0.3, "p95_s": 0.5, "peak_rss_mb": 1536, "speedup": 10.0, "memory_growth_pct": 10.0},
           "cuda": {"p50_s": 0.1}}
STAGES = ("parse", "decode", "resize", "model", "masks", "classify", "polygons", "encode")


# --- slides -----------------------------------------------------------------------------------

def synthetic_slides(folder: Path, count: int, seed: int = 100) -> list[Path]:
    """``count`` 4032x3024 Leishman-like slide JPEGs with phone-camera noise (deterministic per seed)."""
    import cv2

    from trainer.synthetic import render_slide
    from wbc_core.labels import RVPBS_LABELS

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"slide_{seed + i:04d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng(seed + i)
        image, _ = render_slide(rng, 4032, 3024, RVPBS_LABELS, int(rng.integers(1, 3)))
        noisy = image.astype(np.float32)
        noisy += rng.normal(0, 3.0, image.shape[:2]).astype(np.float32)[..., None]  # luminance noise
        noisy += rng.normal(0, 1.5, image.shape).astype(np.float32)                 # chroma noise
        rgb = np.clip(noisy, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise OSError(f"cannot encode {path}")
        path.write_bytes(buf.tobytes())
    return paths


def bad_bodies(good_jpeg: bytes) -> list[tuple[str, bytes]]:
    """The malformed requests of the issue, as raw HTTP bodies."""
    from PIL import Image

    def png(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h)).save(buf, "PNG")
        return buf.getvalue()

    # a PNG whose header declares 100000 x 100000 px (decompression bomb): only the IHDR is rewritten
    import struct
    import zlib
    small = png(8, 8)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]

    def body(image: bytes, **extra: Any) -> bytes:
        return json.dumps({"image": base64.b64encode(image).decode(), **extra}).encode()

    return [
        ("empty", b""),
        ("not json", b"\x89garbage{"),
        ("no image", json.dumps({"threshold": 0.5}).encode()),
        ("not base64", json.dumps({"image": "%%% not base64 %%%"}).encode()),
        ("not an image", body(b"hello, this is text")),
        ("truncated jpeg", body(good_jpeg[: len(good_jpeg) // 2])),
        ("1x1", body(png(1, 1))),
        ("bomb", body(bomb)),
        ("threshold abc", body(png(64, 64), threshold="abc")),
        ("threshold -1", body(png(64, 64), threshold=-1)),
        ("threshold 2", body(png(64, 64), threshold=2)),
    ]


# --- measuring ----------------------------------------------------------------------------------

def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ours(queue: Any, bundle: str, slides: list[str], rounds: int, threads: int, device: str,
          memory_requests: int, threshold: float | None) -> None:
    """Child process: the deployed function, timed request by request."""
    try:
        os.environ["WBC_NUM_THREADS"] = str(threads)
        os.environ["WBC_BUNDLE_DIR"] = bundle
        import torch

        torch.set_num_threads(threads)
        from serverless import main as function
        from serverless.__main__ import build_event, make_context, request_body

        context = make_context(logging.WARNING)
        t0 = time.perf_counter()
        function.init_context(context)
        init_s = time.perf_counter() - t0
        model = context.user_data.model
        if device != "cpu":
            model.predictor.model.to(device)
            model.predictor.device = torch.device(device)
        def body_of(i: int) -> bytes:  # built per request, so the worker holds one body at a time, as in Nuclio
            return request_body(Path(slides[i % len(slides)]).read_bytes(), threshold)

        def serve(body: bytes) -> tuple[Any, float]:
            start = time.perf_counter()
            response = function.handler(context, build_event(body))
            if device != "cpu":
                torch.cuda.synchronize()
            return response, time.perf_counter() - start

        for i in range(2):  # warm-up (allocator, oneDNN kernels)
            serve(body_of(i))
        samples, stages, cells = [], [], []
        for _ in range(rounds):
            for i in range(len(slides)):
                response, seconds = serve(body_of(i))
                if response.status_code != 200:
                    raise RuntimeError(f"status {response.status_code}: {response.body[:300]}")
                # the parse stage also covers the SDK's event deserialisation, timed with the request
                stage = dict(model.last_timings)
                stage["parse"] += max(0.0, seconds - sum(stage.values()))
                samples.append(seconds)
                stages.append(stage)
                cells.append(len(json.loads(response.body)))
        result: dict[str, Any] = {"samples": samples, "stages": stages, "cells": cells[: len(slides)],
                                  "init_s": init_s, "response_mb": len(response.body) / 1e6}
        # memory: mixed good and bad requests in the same worker
        bad = bad_bodies(Path(slides[0]).read_bytes())
        codes: dict[int, int] = {}
        rss_at: dict[int, float] = {}
        for i in range(memory_requests):
            response, _ = serve(body_of(i // 2) if i % 2 == 0 else bad[(i // 2) % len(bad)][1])
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if i + 1 in (20, memory_requests):
                rss_at[i + 1] = rss_mb()
        result["memory"] = {"requests": memory_requests, "status_codes": codes, "rss_mb_at": rss_at,
                            "growth_pct": 100 * (rss_at[memory_requests] / rss_at[20] - 1)}
        result["peak_rss_mb"] = peak_rss_mb()
        queue.put(result)
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def _baseline(queue: Any, slides: list[str], cells: list[int], rounds: int, threads: int, device: str,
              weights: str | None) -> None:
    """Child process: torchvision maskrcnn_resnet50_fpn at its defaults in a CVAT-style handler."""
    try:
        import torch
        from PIL import Image
        from torchvision.models.detection import maskrcnn_resnet50_fpn
        from torchvision.transforms.functional import pil_to_tensor

        from serverless.__main__ import build_event, request_body
        from wbc_core.data.masks import cvat_function_mask_json, mask_to_polygon

        torch.set_num_threads(threads)
        num_classes = 11
        state = None
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("model", state)
            num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        torch.manual_seed(0)
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes)
        if state is not None:
            model.load_state_dict(state)
        model.eval().to(device)
        model.roi_heads.score_thresh = 0.0  # with detections_per_img below: exactly as many cells as ours

        def handler(body: bytes, n_cells: int) -> str:
            data = build_event(body).body
            image = Image.open(io.BytesIO(base64.b64decode(data["image"]))).convert("RGB")
            tensor = pil_to_tensor(image).to(device).float().div_(255)
            model.roi_heads.detections_per_img = max(1, n_cells)
            with torch.inference_mode():
                out = model([tensor])[0]
            masks = (out["masks"][:, 0] >= 0.5).cpu().numpy()
            items = []
            for score, label, mask in zip(out["scores"].tolist(), out["labels"].tolist(), masks, strict=True):
                polygon = mask_to_polygon(mask, tolerance=2.0)
                text = cvat_function_mask_json(mask)
                if polygon is None or text is None:
                    continue
                head = json.dumps({"confidence": str(round(score, 4)), "label": str(label), "type": "mask",
                                   "points": [round(float(v), 2) for v in polygon.reshape(-1)]})
                items.append(head[:-1] + ', "mask": ' + text + "}")
            if device != "cpu":
                torch.cuda.synchronize()
            return "[" + ", ".join(items) + "]"

        bodies = [request_body(Path(p).read_bytes(), None) for p in slides]
        handler(bodies[0], cells[0])  # warm-up
        samples = []
        for _ in range(rounds):
            for body, n in zip(bodies, cells, strict=True):
                start = time.perf_counter()
                handler(body, n)
                samples.append(time.perf_counter() - start)
        queue.put({"samples": samples, "peak_rss_mb": peak_rss_mb(), "num_classes": num_classes,
                   "weights": weights or "random (none can be downloaded here)"})
    except BaseException as exc:
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def run_child(target: Any, *args: Any) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{target.__name__} failed: {result['error']}\n{result['traceback']}")
    return result


# --- report -------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ours, base = result["samples_s"], result.get("baseline_samples_s") or []
    ax1.boxplot([ours] + ([base] if base else []), orientation="horizontal", widths=0.5)
    ax1.set_yticks(range(1, 2 + bool(base)), ["ours"] + (["torchvision R50\n800/1333"] if base else []))
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds per 4032x3024 slide (log)")
    for key, colour in (("p50_s", "tab:green"), ("p95_s", "tab:orange")):
        target = result["targets"].get(key)
        if target:
            ax1.axvline(target, color=colour, ls="--", lw=1, label=f"target {key[:3]} {target} s")
    ax1.legend(fontsize=8, loc="lower right")
    speed = f", {result['speedup']:.1f}x faster" if result.get("speedup") else ""
    ax1.set_title(f"end-to-end through handler (p50 {result['p50_s']:.3f} s{speed})", fontsize=10)
    left = 0.0
    for stage in STAGES:
        width = result["breakdown"][stage]
        ax2.barh([0], [width], left=left, label=f"{stage} {width * 1000:.0f} ms")
        left += width
    ax2.axvline(result["floor_s"], color="k", ls=":", lw=1, label=f"floor {result['floor_s'] * 1000:.0f} ms")
    ax2.set_yticks([])
    ax2.set_xlabel("seconds (mean per request)")
    ax2.set_title("where the time goes (ours)", fontsize=10)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def bccd_comparison(folder: Path) -> dict | None:
    """Mask AP of ours and of the baseline on the BCCD test split, if both benchmarks were run."""
    ours, base = folder / "segmentation_bccd.json", folder / "segmentation_bccd_torchvision.json"
    if not (ours.is_file() and base.is_file()):
        return None
    a, b = json.loads(ours.read_text()), json.loads(base.read_text())
    return {"ours_mask_ap": a["mask_ap"], "baseline_mask_ap": b["mask_ap"],
            "ours_train_minutes": round(a["train_seconds"] / 60, 1),
            "baseline_train_minutes": round(b["train_seconds"] / 60, 1),
            "no_worse": bool(a["mask_ap"] >= b["mask_ap"]),
            "sources": [str(ours.name), str(base.name)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="model bundle the function serves")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--images", type=Path, help="folder of your own slide JPEGs (default: synthetic ones)")
    ap.add_argument("--slides", type=int, default=20, help="how many slides (synthetic, or the first N)")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the slides for ours")
    ap.add_argument("--baseline-slides", type=int, default=6, help="slides timed for the baseline (0: skip)")
    ap.add_argument("--baseline-weights", help="trained maskrcnn_resnet50_fpn weights (default: random)")
    ap.add_argument("--memory-requests", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=None,
                    help="threshold sent in each request, as CVAT does when the user sets one (default: none, "
                         "the bundle's own)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: WBC_NUM_THREADS of function.yaml, or of "
                         "function-gpu.yaml with --device cuda: what is deployed is what is measured)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--p50-target", type=float, default=None,
                    help="judge p50 against this (default: issue 11's; the starter's issue-12 target is 0.5 s)")
    ap.add_argument("--name", default=None, help="result file stem (default: latency_<device>), e.g. "
                    "latency_starter_cpu for the starter bundle")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    deployed = deployed_settings(REPO / ("function-gpu.yaml" if device_kind == "cuda" else "function.yaml"))
    if args.threads is None:
        args.threads = deployed["threads"]

    with tempfile.TemporaryDirectory(prefix="wbc-latency-") as tmp:
        if args.images:
            slides = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:args.slides]
            if not slides:
                ap.error(f"no .jpg files in {args.images}")
        else:
            log.info("rendering %d synthetic 4032x3024 slides", args.slides)
            slides = synthetic_slides(Path(tmp), args.slides)
        sizes = [p.stat().st_size / 1e6 for p in slides]
        log.info("slides: %d JPEGs, %.1f-%.1f MB", len(slides), min(sizes), max(sizes))

        log.info("ours: %d requests + %d mixed for memory", len(slides) * args.rounds, args.memory_requests)
        ours = run_child(_ours, str(args.bundle), [str(p) for p in slides], args.rounds, args.threads, args.device,
                         args.memory_requests, args.threshold)
        base = None
        if args.baseline_slides:
            n = min(args.baseline_slides, len(slides))
            log.info("baseline: torchvision maskrcnn_resnet50_fpn on %d slides", n)
            base = run_child(_baseline, [str(p) for p in slides[:n]], ours["cells"][:n], 1, args.threads,
                             args.device, args.baseline_weights)

    samples = ours["samples"]
    breakdown = {s: float(np.mean([st.get(s, 0.0) for st in ours["stages"]])) for s in STAGES}
    floor = [st["parse"] + st["decode"] + st["encode"] for st in ours["stages"]]
    p50 = percentile(samples, 50)
    result: dict[str, Any] = {
        "p50_s": round(p50, 4),
        "p95_s": round(percentile(samples, 95), 4),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "baseline_p50_s": round(percentile(base["samples"], 50), 4) if base else None,
        "speedup": round(percentile(base["samples"], 50) / p50, 2) if base else None,
        "breakdown": {k: round(v, 4) for k, v in breakdown.items()},
        "slides": len(slides),
        "command": "python " + " ".join(shlex.quote(a) for a in [
            "benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])]),
        "floor_s": round(percentile(floor, 50), 4),
        "total_over_floor": round(p50 / percentile(floor, 50), 2),
        "mean_s": round(float(np.mean(samples)), 4),
        "max_s": round(max(samples), 4),
        "requests_timed": len(samples),
        "request_threshold": args.threshold,
        "memory_growth_pct": round(ours["memory"]["growth_pct"], 2),
        "memory": ours["memory"],
        "init_s": round(ours["init_s"], 2),
        "cells_per_slide": ours["cells"],
        "jpeg_mb": [round(s, 2) for s in sizes],
        "response_mb_last": round(ours["response_mb"], 2),
        "slides_source": str(args.images) if args.images else "synthetic 4032x3024, camera noise, JPEG q92",
        "baseline": None if base is None else {
            "model": "torchvision.models.detection.maskrcnn_resnet50_fpn (min_size 800, max_size 1333)",
            "weights": base["weights"], "slides": len(base["samples"]),
            "p50_s": round(percentile(base["samples"], 50), 3), "peak_rss_mb": round(base["peak_rss_mb"], 1),
            "handler": "PIL full decode, model forward (masks pasted at full size), same CVAT encoding; as many "
                       "cells per slide as ours"},
        "bccd_mask_ap": bccd_comparison(args.out),
        "bundle": {"dir": str(args.bundle), **_bundle_summary(args.bundle)},
        "classifier": _bundle_summary(args.bundle)["classifier"],
        "device": args.device,
        "threads": args.threads,
        "deployed": deployed,
        "cpu": platform.processor() or platform.machine(),
        "git_sha": git_sha(),
        "targets": {**TARGETS[device_kind], **({"p50_s": args.p50_target} if args.p50_target else {})},
        "samples_s": [round(s, 4) for s in samples],
        "baseline_samples_s": [round(s, 4) for s in base["samples"]] if base else None,
    }
    t = result["targets"]
    met = {"p50_s": result["p50_s"] <= t["p50_s"]}
    if device_kind == "cpu":
        met.update({"p95_s": result["p95_s"] <= t["p95_s"], "peak_rss_mb": result["peak_rss_mb"] <= t["peak_rss_mb"],
                    "memory_growth_pct": result["memory_growth_pct"] <= t["memory_growth_pct"]})
        if result["speedup"] is not None:
            met["speedup"] = result["speedup"] >= t["speedup"]
        if result["bccd_mask_ap"] is not None:
            met["bccd_mask_ap_no_worse"] = result["bccd_mask_ap"]["no_worse"]
    result["met"] = met
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"latency_{device_kind}"
    out = args.out / f"{stem}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / f"{stem}.png")
    log.info("p50 %.3f s, p95 %.3f s, peak RSS %.0f MB, floor %.3f s, baseline p50 %s s (speedup %s), "
             "memory growth %.1f%% -> %s", result["p50_s"], result["p95_s"], result["peak_rss_mb"],
             result["floor_s"], result["baseline_p50_s"], result["speedup"], result["memory_growth_pct"], out)
    log.info("breakdown (s): %s; met: %s", result["breakdown"], met)
    return 0


def _bundle_summary(directory: Path) -> dict:
    from wbc_core.bundle import load_bundle

    bundle = load_bundle(directory)
    cfg = bundle.model_config
    classifier = bundle.classifier["config"] if bundle.classifier else None
    return {"backbone": cfg.backbone, "max_size": cfg.max_size, "min_size": cfg.min_size,
            "classes": len(bundle.classes), "score_threshold": bundle.score_threshold,
            "train_seconds": bundle.provenance.get("train_seconds"), "classifier": classifier is not None,
            "classifier_classes": None if classifier is None else len(classifier["classes"]),
            "classifier_tta": None if classifier is None else bool(classifier.get("tta", True)),
            "max_cells": bundle.max_cells}


def deployed_settings(path: Path) -> dict:
    """Threads per worker (WBC_NUM_THREADS) and workers (numWorkers) that a function yaml deploys."""
    import yaml

    spec = yaml.safe_load(path.read_text())["spec"]
    env = {e["name"]: e["value"] for e in spec.get("env") or []}
    return {"file": path.name, "threads": int(env["WBC_NUM_THREADS"]),
            "workers": int(spec["triggers"]["myHttpTrigger"]["numWorkers"])}


if __name__ == "__main__":
    raise SystemExit(main())
