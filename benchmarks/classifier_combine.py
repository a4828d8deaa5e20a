"""Combine partial runs of ``classifier_pbc_to_bccd.py`` into the headline result file.

The full table (7 rows x 2 stain settings, 5 draws for the few-shot rows) costs about 1 h 45 min on 2 CPU
cores, so its rows can be run in parts or on another machine (``--rows``, ``--stains``, ``--device cuda``,
``--name``) and combined here. Every row keeps the ``device`` and the ``seconds`` it was measured with;
rows measured on the CPU are also listed under ``cpu_row_seconds`` for the row-time target (15 min per row
on 2 cores). The targets are recomputed over the rows given, using the rows of the *first* file for any
(method, stain, k) that appears more than once unless ``--prefer-last``.

    python benchmarks/classifier_combine.py --out benchmarks/results/classifier_pbc_to_bccd.json \
        runs/gpu/classifier_pbc_to_bccd_gpu_none.json runs/gpu/classifier_pbc_to_bccd_gpu_reinhard.json \
        benchmarks/results/classifier_pbc_to_bccd_cpu.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classifier_pbc_to_bccd import ROW_SECONDS_LIMIT, check_targets


def combine(files: list[Path], prefer_last: bool = False) -> dict[str, Any]:
    rows: dict[tuple, dict[str, Any]] = {}
    cpu_seconds: list[dict[str, Any]] = []
    parts = []
    base: dict[str, Any] = {}
    for path in files:
        data = json.loads(path.read_text())
        base = base or data
        device = (data.get("machine") or {}).get("device", "cpu")
        gpu = (data.get("machine") or {}).get("gpu")
        parts.append({"file": path.name, "command": data.get("command"), "device": device, "gpu": gpu,
                      "complete": data.get("complete"), "git_sha": data.get("git_sha"),
                      "finetune": {k: (data.get("config") or {}).get("train", {}).get(k)
                                   for k in ("finetune_lr", "finetune_steps")}})
        finetune = parts[-1]["finetune"]
        for row in data["rows"]:
            row = {**row, "device": device, "source_file": path.name}
            if row["method"] == "finetune":
                row["finetune_lr"], row["finetune_steps"] = finetune["finetune_lr"], finetune["finetune_steps"]
            key = (row["method"], row["stain_norm"], row["k"])
            if device == "cpu":
                cpu_seconds.append({"method": row["method"], "stain_norm": row["stain_norm"], "k": row["k"],
                                    "seconds": row["seconds"], "file": path.name})
            if key not in rows or prefer_last:
                rows[key] = row
    ordered = sorted(rows.values(), key=lambda r: (r["stain_norm"], ["source-only", "target-only", "finetune",
                                                                     "dann"].index(r["method"]),
                                                   10_000 if r["k"] is None else r["k"]))
    targets = check_targets(ordered)
    slow = [c for c in cpu_seconds if c["seconds"] > ROW_SECONDS_LIMIT]
    targets["row_time"] = {"target": f"each row <= {ROW_SECONDS_LIMIT} s on 2 CPU cores",
                           "cpu_rows_timed": len(cpu_seconds), "over": slow, "met": bool(cpu_seconds) and not slow}
    return {
        "benchmark": base.get("benchmark"),
        "headline": base.get("headline"),
        "rows": ordered,
        "targets": targets,
        "cpu_row_seconds": cpu_seconds,
        "parts": parts,
        "evaluation_crops": base.get("evaluation_crops"), "evaluation_per_class": base.get("evaluation_per_class"),
        "labelled_pool": base.get("labelled_pool"), "labelled_pool_per_class": base.get("labelled_pool_per_class"),
        "source_crops": base.get("source_crops"), "source_per_class": base.get("source_per_class"),
        "source_excluded": base.get("source_excluded"), "target_crops": base.get("target_crops"),
        "notes": base.get("notes", []),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+", help="result files of classifier_pbc_to_bccd.py runs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prefer-last", action="store_true", help="a row present in several files: take the last")
    ap.add_argument("--note", action="append", default=[], help="a note to add to the result")
    args = ap.parse_args(argv)
    result = combine(args.files, args.prefer_last)
    result["notes"] = list(result["notes"]) + args.note
    result["command"] = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/classifier_combine.py",
                                                                      *(argv if argv is not None else sys.argv[1:])])
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, check in result["targets"].items():
        print(f"{key}: {'MET' if check['met'] else 'NOT MET'} {json.dumps(check)}")
    print(f"{len(result['rows'])} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
