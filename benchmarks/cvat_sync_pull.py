"""cvat_sync against the CVAT stand-in: parallel download speed, a no-change re-pull, and a pull under faults.

A 100-frame task of 4032x3024 slide photos (2.5-3 MB JPEGs, as phones take them; 10 rendered slides, each
frame made unique by a JPEG comment) is served by the stand-in on 127.0.0.1 (real HTTP). A real CVAT spends
time on every frame request (auth, a database query, reading the file); the stand-in adds ``--latency``
seconds per frame request to stand for that, so the parallel speed-up is about hiding server latency, not
about the loopback network.

1. sequential pull (1 worker) and parallel pull (``--workers``): frames/s and the speed-up;
2. re-pull with nothing changed: requests made and image bytes sent (targets: <= 5 requests, 0 bytes);
3. pull with ``--fault-rate`` of all requests failing (500/502/503, 429 + Retry-After, connections reset,
   bodies dropped or truncated mid-way): must end complete, every frame byte-identical to the upload.

    python benchmarks/cvat_sync_pull.py --out benchmarks/results

Writes ``cvat_sync.json`` and ``cvat_sync.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvat_sync.client import CvatClient, RetryPolicy  # noqa: E402
from cvat_sync.config import Secret, Settings  # noqa: E402
from cvat_sync.pull import PullOptions, pull_tasks  # noqa: E402
from tests.cvat_standin import StandinCVAT  # noqa: E402
from trainer.synthetic import render_slide  # noqa: E402
from wbc_core.labels import RVPBS_LABELS  # noqa: E402

log = logging.getLogger("cvat_sync_bench")
FAULTS = (("status", {"status": 500}), ("status", {"status": 502}), ("status", {"status": 503}),
          ("throttle", {"retry_after": 1}), ("reset", {}), ("drop", {}), ("truncate", {}))


def slide_frames(n: int, distinct: int = 10, seed: int = 7) -> tuple[list[tuple[str, bytes]], list[list[dict]]]:
    """``n`` unique 4032x3024 JPEGs and, per frame, its cells as CVAT polygon shapes (label names)."""
    rng = np.random.default_rng(seed)
    bases, cells = [], []
    for _ in range(distinct):
        image, instances = render_slide(rng, 4032, 3024, RVPBS_LABELS, int(rng.integers(1, 3)))
        noisy = image.astype(np.float32) + rng.normal(0, 3.0, image.shape[:2]).astype(np.float32)[..., None]
        ok, buf = cv2.imencode(".jpg", np.clip(noisy, 0, 255).astype(np.uint8)[..., ::-1],
                               [cv2.IMWRITE_JPEG_QUALITY, 92])
        assert ok
        bases.append(buf.tobytes())
        cells.append([{"label": inst.label, "points": [round(float(v), 2) for v in inst.polygon.reshape(-1)]}
                      for inst in instances])
    frames, shapes = [], []
    for i in range(n):
        base = bases[i % distinct]
        comment = f"frame {i}".encode()
        # a COM segment right after SOI makes every frame's bytes (and sha256) unique
        data = base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]
        frames.append((f"IMG_{i:04d}.jpg", data))
        shapes.append(cells[i % distinct])
    return frames, shapes


def build_task(cvat: StandinCVAT, frames: list[tuple[str, bytes]], cells: list[list[dict]]) -> int:
    tid = cvat.add_task("benchmark-100", frames=frames, labels=[{"name": n, "type": "polygon"} for n in RVPBS_LABELS],
                        segment_size=25)
    ids = {lab.name: lab.id for lab in cvat.task_labels(cvat.task(tid))}
    cvat.set_annotations(tid, [{"type": "polygon", "frame": f, "label_id": ids[c["label"]], "points": c["points"]}
                               for f, frame_cells in enumerate(cells) for c in frame_cells])
    for job in cvat.task(tid).jobs:
        cvat.set_job_state(job, state="completed")
    return tid


def run_pull(cvat: StandinCVAT, tid: int, out: Path, workers: int, retry: RetryPolicy) -> tuple[Any, float, int]:
    settings = Settings(url=cvat.url, token=Secret(cvat.admin_token or ""))
    t0 = time.perf_counter()
    with CvatClient(settings, retry=retry, pool_size=max(8, workers)) as client:
        report = pull_tasks(client, [tid], PullOptions(out=out, workers=workers, progress=False))[0]
        made = client.requests_made
    return report, time.perf_counter() - t0, made


def verify(out: Path, tid: int, frames: list[tuple[str, bytes]]) -> bool:
    folder = out / f"task-{tid}"
    prov = json.loads((folder / "cvat_sync.json").read_text())
    if len(prov["frames"]) != len(frames):
        return False
    want = {name: hashlib.sha256(data).hexdigest() for name, data in frames}
    return all(want[f["name"]] == f["sha256"] == hashlib.sha256((folder / "images" / f["name"]).read_bytes())
               .hexdigest() for f in prov["frames"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = ["sequential (1 worker)", f"parallel ({result['workers']} workers)", f"{result['fault_rate']:.0%} faults"]
    values = [result["sequential_frames_per_s"], result["frames_per_s"], result["fault_run_frames_per_s"]]
    bars = ax.barh(names, values, color=["tab:gray", "tab:green", "tab:orange"])
    ax.bar_label(bars, fmt="%.1f frames/s", padding=3, fontsize=8)
    ax.set_xlabel(f"frames/s, {result['frames']} frames of 4032x3024 ({result['mb_per_frame']:.1f} MB each), "
                  f"{result['server_latency_s'] * 1000:.0f} ms server latency", fontsize=8)
    ax.set_xlim(0, max(values) * 1.35)
    ax.set_title(f"cvat_sync pull: {result['parallel_speedup']:.1f}x parallel speed-up; no-change re-pull "
                 f"{result['repull_requests']} requests", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds the stand-in spends per frame request")
    ap.add_argument("--fault-rate", type=float, default=0.2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cvat_sync").setLevel(logging.WARNING)

    log.info("rendering %d frames", args.frames)
    frames, cells = slide_frames(args.frames)
    mb = float(np.mean([len(d) for _, d in frames])) / 1e6
    retry = RetryPolicy(attempts=10, backoff=0.05, max_wait=2.0)
    with tempfile.TemporaryDirectory(prefix="cvat-sync-bench-") as tmp, StandinCVAT(seed=3) as cvat:
        tmp_path = Path(tmp)
        tid = build_task(cvat, frames, cells)
        cvat.add_fault("delay", "frame", delay=args.latency)

        log.info("sequential pull")
        _seq, seq_s, _ = run_pull(cvat, tid, tmp_path / "seq", 1, retry)
        log.info("parallel pull (%d workers)", args.workers)
        cvat.reset_log()
        _par, par_s, par_requests = run_pull(cvat, tid, tmp_path / "par", args.workers, retry)
        complete = verify(tmp_path / "par", tid, frames) and verify(tmp_path / "seq", tid, frames)

        log.info("re-pull, nothing changed")
        cvat.reset_log()
        again, again_s, again_requests = run_pull(cvat, tid, tmp_path / "par", args.workers, retry)
        repull_log = cvat.log
        repull_image_bytes = cvat.bytes_sent("frame")

        log.info("pull with %.0f%% of requests failing", args.fault_rate * 100)
        faults = [cvat.add_fault(kind, "any", rate=args.fault_rate / len(FAULTS), **extra) for kind, extra in FAULTS]
        cvat.reset_log()
        faulty, faulty_s, _faulty_requests = run_pull(cvat, tid, tmp_path / "faults", args.workers, retry)
        fault_log = cvat.log
        fired = {f"{f.kind}{'-' + str(f.status) if f.kind == 'status' else ''}": f.fired for f in faults}
        fault_complete = verify(tmp_path / "faults", tid, frames)

    result = {
        "frames": args.frames,
        "frames_per_s": round(args.frames / par_s, 2),
        "parallel_speedup": round(seq_s / par_s, 2),
        "repull_requests": len(repull_log),
        "repull_image_bytes": repull_image_bytes,
        "fault_rate": args.fault_rate,
        "fault_run_complete": bool(fault_complete and faulty.frames == args.frames),
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/cvat_sync_pull.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
        "workers": args.workers,
        "server_latency_s": args.latency,
        "mb_per_frame": round(mb, 2),
        "sequential_seconds": round(seq_s, 2),
        "parallel_seconds": round(par_s, 2),
        "sequential_frames_per_s": round(args.frames / seq_s, 2),
        "parallel_mb_per_s": round(args.frames * mb / par_s, 1),
        "first_pull_requests": par_requests,
        "first_pull_complete_and_verified": complete,
        "repull_status": again.status,
        "repull_seconds": round(again_s, 3),
        "repull_client_requests": again_requests,
        "repull_calls": [f"{e.method} {e.path}" for e in repull_log],
        "fault_run_seconds": round(faulty_s, 2),
        "fault_run_frames_per_s": round(args.frames / faulty_s, 2),
        "fault_run_requests": len(fault_log),
        "fault_run_failed_responses": sum(1 for e in fault_log if e.fault not in (None, "delay")),
        "faults_fired": fired,
        "targets": {"repull_requests": 5, "repull_image_bytes": 0, "fault_run_complete": True},
        "met": {"repull_requests": len(repull_log) <= 5, "repull_image_bytes": repull_image_bytes == 0,
                "fault_run_complete": bool(fault_complete)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cvat_sync.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "cvat_sync.png")
    log.info("%d frames: %.1f frames/s parallel, %.1fx over sequential; re-pull %d requests, %d image bytes; "
             "%d%% faults (%d failed responses): complete=%s", args.frames, result["frames_per_s"],
             result["parallel_speedup"], result["repull_requests"], repull_image_bytes, args.fault_rate * 100,
             result["fault_run_failed_responses"], result["fault_run_complete"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
