"""The expert's corrections, measured: edits per frame as frames are corrected, random vs ranked order (issue 14).

For a public set (its training split is the pool CVAT task, its test split the held-back frames), for each
seed and each order, :class:`trainer.correction_sim.Simulation` runs the product's loop against a CVAT stand-in
on 127.0.0.1: the function pre-annotates, a simulated expert corrects a batch of ``--batch`` frames (chosen at
random, or ranked by ``python -m cvat_sync rank``'s uncertainty and put in a new task), ``python -m trainer
retrain`` pulls, fine-tunes, gates and promotes, the function hot-reloads. After every cycle the edits the
expert would make on the held-back frames are counted (:mod:`trainer.correction_effort`: delete a false cell,
draw a missed one, redraw an outline under ``--redraw-iou`` mask IoU; class-agnostic).

Before the runs, the uncertainty signals are measured against the edits they should predict: the start bundle
pre-annotates every pool frame, and each signal's Spearman correlation with each kind of edit per frame (redraw,
draw, delete, relabel) is computed (permutation p-value). In the ranked order a signal weighs the sum, over the
kinds it predicts (rho > 0, p < 0.05), of rho times the kind's share of the pool's edits (:func:`signal_weights`;
signals non-zero on fewer than 5 frames are left out). The ranked order is ``cvat_sync rank``'s: that uncertainty
times the typicality of the frame's cells to the power ``--density-power`` (default 2, :mod:`wbc_core.typicality`),
with a fifth of each batch taken from the frames the retrain will hold out for its gate (:mod:`wbc_core.split`).

    python benchmarks/correction_effort.py --set bccd --start runs/loso-bccd/served --data-root ../shared/data \\
        --seeds 0 1 2 --batch 10 --cycles 3 --steps 200 --minutes 12 --out benchmarks/results

``--steps`` makes every retrain train exactly that many steps with the run's seed, so a run repeats on a busy
machine (``--minutes`` then only caps a cycle); without it each fine-tune stops on the clock, and the same frames
gave 0.29 and 0.36 of from-scratch in two runs.

``runs/loso-bccd/served`` is the leave-BCCD-out starter (Bio-Net boxes and synthetic outlines, never a BCCD frame),
trained and served as the shipped starter is (1524 steps, the shipped starter's count; 72 px red cells,
threshold 0.9); about 50 minutes on 2 cores:

    python -m trainer train-starter --data-root ../shared/data --out runs/loso-bccd --leave-out bccd \\
        --max-steps 1524 --no-classifier
    python -m trainer package-bundle runs/loso-bccd/bundle runs/loso-bccd/served --rbc-px 72 --threshold 0.9

Writes ``correction_effort.json`` (keys ``sets``, ``batch``, ``seeds``, ``curves``, ``scratch_edits_per_frame``,
``frames_to_25pct``, ``total_edits``, ``cycle_seconds``, ``signals``, ``runs``, ``command``) and
``correction_effort.png``. Every finished run is kept in ``--work``/runs.json, so an interrupted benchmark
resumes where it stopped.

A seed that never reaches 25% of from-scratch counts every edit it spent, a floor on what reaching would have
cost; ``met.ranked_saving_is`` says whether the ranked saving is exact or a bound because of that. Give enough
``--cycles`` that most seeds of both orders reach it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("correction_effort")
TARGET_RATIO = 0.25          # edits per frame after 30 corrected frames, as a share of from-scratch
TARGET_RANKED_SAVING = 0.20  # ranked order: fewer total edits than random by at least this share
TARGET_FRAMES = 30
MIN_NONZERO_FRAMES = 5       # a signal seen on fewer pool frames is not kept, whatever its correlation
EDIT_KINDS = ("redrawn", "drawn", "deleted", "relabelled")  # trainer.correction_effort.FrameEdits' kinds of edit


def gate_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """The retrain gate settings the command line changes (None: the retrain defaults)."""
    out: dict[str, Any] = {}
    if args.gate_noise_z is not None:
        out["noise_z"] = args.gate_noise_z
    if args.gate_keep_unedited:
        out["ignore_unedited"] = False
    return out or None


def gate_used(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The retrain gate of every cycle: the retrain defaults, with the command line's changes."""
    from trainer.retrain import GateConfig

    return dataclasses.asdict(GateConfig(**(overrides or {})))


def load_split(name: str, data_root: Path, split: str) -> Any:
    from benchmarks.generalisation import load_set

    return load_set(name, data_root, split)


# --- which signals predict edits ------------------------------------------------------------------------------

def spearman(x: np.ndarray, y: np.ndarray, permutations: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Spearman's rho (average ranks for ties) and a one-sided permutation p-value for rho > 0."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):
            same = v == value
            r[same] = r[same].mean()
        return r

    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0, 1.0
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    null = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(permutations)])
    return rho, float((np.sum(null >= rho) + 1) / (permutations + 1))


def signal_study(bundle: Path, pool: Any, rules: Any, progress: bool) -> dict[str, Any]:
    """Each signal (and their equal-weight sum) against the edits of every pool frame, pre-annotated by ``bundle``,
    kind by kind; the ranking weights are :func:`signal_weights` of them."""
    from tqdm import tqdm

    from trainer.correction_effort import count_edits, instances_from_cvat_results
    from wbc_core.bundle import load_bundle
    from wbc_core.cvat_json import detection_to_cvat_results
    from wbc_core.data.images import read_rgb
    from wbc_core.detect import Predictor
    from wbc_core.uncertainty import SIGNALS, FrameUncertainty, frame_uncertainty, scores

    predictor = Predictor(load_bundle(bundle))
    rows = []
    t0 = time.perf_counter()
    for record in tqdm(pool.images, desc="signals vs edits", unit="frame", disable=not progress):
        image, _ = read_rgb(record.path)
        detection, signals = frame_uncertainty(predictor, image)
        predicted = instances_from_cvat_results(detection_to_cvat_results(detection))
        edits = count_edits(predicted, record.instances, record.height, record.width, rules)
        rows.append({**signals.to_dict(), **{kind: getattr(edits, kind) for kind in EDIT_KINDS}, "edits": edits.edits})
    combined = scores([FrameUncertainty(**{k: v for k, v in r.items() if k in SIGNALS or k == "cells"})
                       for r in rows])
    values = {name: np.array([r[name] or 0 for r in rows], float) for name in SIGNALS}
    values["sum"] = np.array(combined, float)
    edits = {kind: np.array([r[kind] for r in rows], float) for kind in (*EDIT_KINDS, "edits")}
    out: dict[str, Any] = {"frames": len(rows), "bundle": str(bundle), "seconds": round(time.perf_counter() - t0, 1),
                           "mean_edits": float(edits["edits"].mean()),
                           "edits_by_kind": {kind: int(edits[kind].sum()) for kind in EDIT_KINDS}, "per_signal": {}}
    for name, value in values.items():
        some = value > 0
        out["per_signal"][name] = {
            **correlation(value, edits["edits"]), "mean": float(value.mean()), "frames_nonzero": int(some.sum()),
            "edits_when_nonzero": float(edits["edits"][some].mean()) if some.any() else None,
            "edits_when_zero": float(edits["edits"][~some].mean()) if (~some).any() else None,
            "by_kind": {kind: correlation(value, edits[kind]) for kind in EDIT_KINDS if edits[kind].any()}}
    weights = signal_weights(out["per_signal"], out["edits_by_kind"], list(SIGNALS))
    out["kept"] = [name for name, w in weights.items() if w > 0]
    out["weights"] = weights if out["kept"] else {name: 1.0 for name in SIGNALS}
    return out


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    rho, p = spearman(x, y)
    return {"rho": round(rho, 3), "p": round(p, 4)}


def signal_weights(per_signal: dict[str, Any], edits_by_kind: dict[str, int], signals: list[str]) -> dict[str, float]:
    """How much each signal counts in the ranked order: the sum, over the kinds of edit, of the kind's share of
    all the pool's edits times the signal's Spearman rho with that kind's count per frame, for the kinds it
    predicts (rho > 0, p < 0.05); 0 for a signal non-zero on fewer than :data:`MIN_NONZERO_FRAMES` frames.

    A kind of edit counts as much as it is common: the first corrections should teach the mistake the model makes
    on most frames. A signal that predicts a rare kind (a few missed cells among many rough outlines) would
    otherwise pick outlier frames: on BCCD such a batch cost twice the edits and made the held-back frames worse.
    """
    total = sum(edits_by_kind.values())
    weights = {}
    for name in signals:
        stats = per_signal[name]
        weight = 0.0
        if total and stats["frames_nonzero"] >= MIN_NONZERO_FRAMES:
            weight = float(sum(edits_by_kind[kind] / total * c["rho"] for kind, c in stats["by_kind"].items()
                               if c["rho"] > 0 and c["p"] < 0.05))
        weights[name] = round(weight, 4)
    return weights


# --- one run --------------------------------------------------------------------------------------------------

def run_one(order: str, seed: int, args: argparse.Namespace, pool: Any, held: Any, weights: dict[str, float] | None,
            work: Path) -> dict[str, Any]:
    from cvat_sync.client import CvatClient
    from cvat_sync.config import Secret, Settings
    from tests.cvat_standin import StandinCVAT
    from trainer.correction_effort import EditRules
    from trainer.correction_sim import WBC_LABEL, Simulation, SimulationConfig, child_env
    from wbc_core.bundle import load_bundle

    rules = EditRules(redraw_iou=args.redraw_iou, check_labels=False)
    cfg = SimulationConfig(order=order, seed=seed, batch=args.batch, cycles=args.cycles, minutes=args.minutes,
                           min_steps=args.min_steps, steps=args.steps,
                           segmenter_config=str(args.segmenter_config) if args.segmenter_config else None,
                           ignore_unedited_outlines=not args.learn_unedited_outlines,
                           start=str(args.start) if args.start else None, rules=rules, weights=weights,
                           density_power=args.density_power,
                           gate=gate_overrides(args),
                           ideal_expert=args.ideal_expert)
    bundle_labels = list(load_bundle(args.start).contract.labels) if args.start else []
    labels = [{"name": n, "type": "any"} for n in dict.fromkeys([WBC_LABEL, *bundle_labels])]
    with StandinCVAT(seed=seed) as cvat:
        settings = Settings(url=cvat.url, token=Secret(cvat.admin_token))
        with CvatClient(settings) as client:
            created = client.create_task(f"{args.set} pool", labels)
            client.upload_task_images(created["id"], [(r.name, r.path.read_bytes()) for r in pool.images],
                                      sorting_method="predefined")
            sim = Simulation(cfg, client, created["id"], pool, held, work, child_env(cvat.url, cvat.admin_token),
                             progress=args.progress)
            return sim.run()


def min_steps_used(args: argparse.Namespace) -> int:
    from trainer.retrain import SegmenterStep

    return SegmenterStep().min_steps if args.min_steps is None else args.min_steps


def segmenter_config_used(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer config every retrain fine-tunes with, as its settings (a changed file is another setting)."""
    from trainer.config import load_config

    return load_config(args.segmenter_config).to_dict()


def density_power_used(args: argparse.Namespace) -> float:
    from wbc_core.typicality import DENSITY_POWER

    return DENSITY_POWER if args.density_power is None else args.density_power


def run_settings(args: argparse.Namespace, pool_frames: int, held_frames: int) -> dict[str, Any]:
    """What a run's result depends on besides its order and seed (a resumed --work folder must match)."""
    return {"set": args.set, "start": str(args.start) if args.start else None, "batch": args.batch,
            "cycles": args.cycles, "minutes": args.minutes, "min_steps": min_steps_used(args), "steps": args.steps,
            "segmenter_config": segmenter_config_used(args),
            "learn_unedited_outlines": args.learn_unedited_outlines,
            "redraw_iou": args.redraw_iou, "density_power": density_power_used(args),
            "pool_frames": pool_frames, "held_frames": held_frames, "gate_noise_z": args.gate_noise_z,
            "gate_ignore_unedited": not args.gate_keep_unedited, "ideal_expert": args.ideal_expert}


# --- aggregation ----------------------------------------------------------------------------------------------

def aggregate(runs: list[dict[str, Any]], orders: list[str], scratch: float) -> dict[str, Any]:
    curves, reach, totals, totals_all, cycle_s = {}, {}, {}, {}, []
    for order in orders:
        mine = [r for r in runs if r["order"] == order]
        if not mine:
            continue
        frames = [p["corrected"] for p in mine[0]["result"]["curve"]]
        eps = np.array([[p["edits_per_frame"] for p in r["result"]["curve"]] for r in mine])
        ratio = np.array([[p["ratio_to_scratch"] or 0.0 for p in r["result"]["curve"]] for r in mine])
        curves[order] = {"frames": frames, "edits_per_frame": {"mean": eps.mean(0).round(4).tolist(),
                                                               "sd": eps.std(0).round(4).tolist()},
                         "ratio_to_scratch": {"mean": ratio.mean(0).round(4).tolist(),
                                              "sd": ratio.std(0).round(4).tolist()},
                         "accepted_per_frame": {"mean": np.mean([[p["accepted_per_frame"] for p in r["result"]["curve"]]
                                                                 for r in mine], 0).round(4).tolist()}}
        per_seed_reach, per_seed_total = [], []
        for r in mine:
            hit = next((p["corrected"] for p in r["result"]["curve"] if (p["ratio_to_scratch"] or 0) <= TARGET_RATIO),
                       None)
            per_seed_reach.append(hit)
            spent = r["result"]["batch_edits"]
            n = len(spent) if hit is None else hit // r["result"]["config"]["batch"]
            per_seed_total.append(int(sum(spent[:n])))
        reached = [h for h in per_seed_reach if h is not None]
        reach[order] = {"per_seed": per_seed_reach, "mean": float(np.mean(reached)) if reached else None,
                        "seeds_reaching": len(reached)}
        totals[order] = {"per_seed": per_seed_total, "mean": float(np.mean(per_seed_total)),
                         "sd": float(np.std(per_seed_total)),
                         "note": "edits spent correcting frames until the held-back frames needed <= 25% of "
                                 "from-scratch (all corrected frames when never reached)"}
        all_spent = [int(sum(r["result"]["batch_edits"])) for r in mine]
        totals_all[order] = {"per_seed": all_spent, "mean": float(np.mean(all_spent)), "sd": float(np.std(all_spent))}
        cycle_s += [c["cycle_seconds"] for r in mine for c in r["result"]["cycles"]]
    return {"curves": curves, "frames_to_25pct": reach, "total_edits": totals, "total_edits_all_frames": totals_all,
            "scratch_edits_per_frame": scratch,
            "cycle_seconds": {"mean": float(np.mean(cycle_s)) if cycle_s else None,
                              "max": float(np.max(cycle_s)) if cycle_s else None, "n": len(cycle_s)}}


def saving_kind(reach: dict[str, Any]) -> str:
    """Say what the ranked saving is when a seed never reached 25%: its total is then every edit it spent, a floor
    on what reaching would have cost. A floor on random's side understates the saving; on ranked's, overstates it;
    on both sides, it is no bound at all."""
    short = {order: len(reach[order]["per_seed"]) - reach[order]["seeds_reaching"] for order in ("ranked", "random")}
    floor = "so its total is a floor on what reaching would have cost"
    if short["ranked"] and short["random"]:
        return (f"no bound: ranked did not reach 25% in {short['ranked']} seed(s) and random in {short['random']}, "
                "so both totals are floors on what reaching would have cost")
    if short["ranked"]:
        return f"an upper bound: ranked did not reach 25% in {short['ranked']} seed(s), {floor}"
    if short["random"]:
        return f"a lower bound: random did not reach 25% in {short['random']} seed(s), {floor}"
    return "exact: every seed of both orders reached 25%"


def judge(result: dict[str, Any]) -> dict[str, Any]:
    met: dict[str, Any] = {}
    for order, curve in result["curves"].items():
        if TARGET_FRAMES in curve["frames"]:
            i = curve["frames"].index(TARGET_FRAMES)
            met[f"{order}_ratio_at_{TARGET_FRAMES}"] = curve["ratio_to_scratch"]["mean"][i]
            met[f"{order}_ratio_at_{TARGET_FRAMES}_met"] = curve["ratio_to_scratch"]["mean"][i] <= TARGET_RATIO
    totals = result["total_edits"]
    if "random" in totals and "ranked" in totals and totals["random"]["mean"] > 0:
        saving = 1 - totals["ranked"]["mean"] / totals["random"]["mean"]
        met["ranked_saving"] = round(saving, 4)
        met["ranked_saving_met"] = saving >= TARGET_RANKED_SAVING
        met["ranked_saving_is"] = saving_kind(result["frames_to_25pct"])
    return met


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"random": "tab:grey", "ranked": "tab:blue"}
    for order, curve in result["curves"].items():
        x = np.array(curve["frames"])
        m, sd = np.array(curve["edits_per_frame"]["mean"]), np.array(curve["edits_per_frame"]["sd"])
        ax.plot(x, m, "o-", color=colours.get(order), label=f"{order} order (mean of {len(result['seeds'])} seeds)")
        ax.fill_between(x, m - sd, m + sd, color=colours.get(order), alpha=0.2)
    scratch = result["scratch_edits_per_frame"]
    ax.axhline(scratch, color="black", ls=":", lw=1, label=f"from scratch ({scratch:.2f})")
    ax.axhline(scratch * TARGET_RATIO, color="red", ls="--", lw=1, label="target: 25% of from scratch")
    ax.set_xlabel("frames corrected by the expert")
    ax.set_ylabel("edits per held-back frame")
    ax.set_ylim(bottom=0)
    start = result.get("start") or "no model"
    ax.set_title(f"{', '.join(result['sets'])}: expert edits, a retrain every {result['batch']} frames, starting from "
                 f"{start}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="bccd", choices=("bccd",), help="the public set (needs outlines: bccd)")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--start", type=Path, help="bundle served before the first correction (default: no model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--orders", nargs="+", default=["random", "ranked"], choices=("random", "ranked"))
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=2.5, help="fine-tuning budget per retrain cycle")
    ap.add_argument("--steps", type=int, metavar="N",
                    help="each retrain trains exactly N steps, seeded by the run's seed (segmenter.steps): runs "
                         "repeat, whatever else the machine does; --minutes then only caps a cycle (default: "
                         "--minutes decides)")
    ap.add_argument("--segmenter-config", type=Path, metavar="YAML",
                    help="trainer config each retrain fine-tunes with (segmenter.config; default: the packaged "
                         "CPU config), e.g. to compare train.precise_bn_frames or model.trainable_backbone_layers")
    ap.add_argument("--min-steps", type=int, metavar="N",
                    help="each retrain trains at least N steps within --minutes (segmenter.min_steps; default: the "
                         "retrain default; 0: the config's epochs alone, which end a 6-frame fine-tune after 42)")
    ap.add_argument("--learn-unedited-outlines", action="store_true",
                    help="the retrains learn outlines from the cells CVAT holds as the function drew them too "
                         "(segmenter.ignore_unedited_outlines: false; by default they train finding cells only)")
    ap.add_argument("--density-power", type=float,
                    help="the ranked order's score = uncertainty x typicality ** P (default: cvat_sync rank's, 2; "
                         "0: uncertainty only)")
    ap.add_argument("--redraw-iou", type=float, default=0.85)
    ap.add_argument("--pool-frames", type=int, help="use this many frames of the training split (seeded choice)")
    ap.add_argument("--held-frames", type=int, help="use this many frames of the test split (seeded choice)")
    ap.add_argument("--gate-noise-z", type=float, metavar="Z",
                    help="the retrain gate's noise_z (default: the retrain default; 0: a fixed allowance alone)")
    ap.add_argument("--gate-keep-unedited", action="store_true",
                    help="score the gate's outlines on every cell, the ones CVAT holds as the function drew them "
                         "included (the gate before issue 14's fix: it favours the model that drew them)")
    ap.add_argument("--ideal-expert", action="store_true",
                    help="save every corrected cell with its true outline, even the ones the expert accepted (an "
                         "upper bound; by default accepted cells keep the function's outline, as CVAT stores them)")
    ap.add_argument("--work", type=Path, default=Path("runs/correction-effort"),
                    help="run folder; runs already in it are kept (resume), if made with the same settings")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="correction_effort", help="result file names: NAME.json, NAME.png")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/NAME.png from OUT/NAME.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be at least 1, not {args.steps}")
    if args.replot:
        plot(json.loads((args.out / f"{args.name}.json").read_text()), args.out / f"{args.name}.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.correction_effort import EditRules
    from trainer.multiset import subset_frames

    t_all = time.perf_counter()
    pool = load_split(args.set, args.data_root, "train")
    held = load_split(args.set, args.data_root, "test")
    rng = np.random.default_rng(1234)
    if args.pool_frames and args.pool_frames < len(pool.images):
        pool = subset_frames(pool, sorted(rng.choice(len(pool.images), args.pool_frames, replace=False).tolist()))
    if args.held_frames and args.held_frames < len(held.images):
        held = subset_frames(held, sorted(rng.choice(len(held.images), args.held_frames, replace=False).tolist()))
    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "runs.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"runs": []}
    settings = run_settings(args, len(pool.images), len(held.images))
    if state["runs"] and state.get("settings") != settings:
        ap.error(f"{state_path} holds runs made with other settings ({state.get('settings')}, now {settings}): "
                 "give another --work folder, or delete that one to start over")
    state["settings"] = settings
    rules = EditRules(redraw_iou=args.redraw_iou, check_labels=False)
    if "signals" not in state and args.start and "ranked" in args.orders:
        state["signals"] = signal_study(args.start, pool, rules, args.progress)
        state_path.write_text(json.dumps(state, indent=1))
        log.info("signals vs edits: %s; weights %s", {k: v["rho"] for k, v in state["signals"]["per_signal"].items()},
                 state["signals"]["weights"])
    weights = state.get("signals", {}).get("weights")
    for seed in args.seeds:
        for order in args.orders:
            if any(r["order"] == order and r["seed"] == seed for r in state["runs"]):
                log.info("%s seed %d: done in an earlier run, kept", order, seed)
                continue
            t0 = time.perf_counter()
            result = run_one(order, seed, args, pool, held, weights, args.work / f"{order}-seed{seed}")
            state["runs"].append({"order": order, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                                  "result": result})
            state_path.write_text(json.dumps(state, indent=1, default=str))
    runs = [r for r in state["runs"] if r["seed"] in args.seeds and r["order"] in args.orders]
    scratch = runs[0]["result"]["curve"][0]["scratch_edits_per_frame"] if runs else 0.0
    result: dict[str, Any] = {
        "sets": [args.set], "batch": args.batch, "seeds": args.seeds, "cycles": args.cycles,
        "start": str(args.start) if args.start else None, "minutes_per_cycle": args.minutes,
        "min_steps_per_cycle": min_steps_used(args), "steps_per_cycle": args.steps,
        "segmenter_config": str(args.segmenter_config or "trainer/configs/segmenter-cpu.yaml"),
        "outlines_learned_from": ("every saved cell" if args.learn_unedited_outlines else
                                  "the cells the expert drew or redrew (not those left as the function drew them)"),
        "pool_frames": len(pool.images), "held_back_frames": len(held.images),
        "rules": {"redraw_iou": args.redraw_iou, "match_iou": rules.match_iou, "labels": "class-agnostic"},
        "expert_saves": ("the true outline of every cell" if args.ideal_expert else
                         "what CVAT holds: the function's outline for the cells left as they were, the true one "
                         "for redrawn and drawn cells"),
        "gate": gate_used(gate_overrides(args)),   # the retrain gate every cycle ran
        **aggregate(runs, args.orders, scratch),
        "signals": state.get("signals"),
        "runs": [{"order": r["order"], "seed": r["seed"], "seconds": r["seconds"],
                  "curve": [{k: p[k] for k in ("corrected", "version", "edits_per_frame", "ratio_to_scratch",
                                               "accepted_per_frame")} for p in r["result"]["curve"]],
                  "batch_edits": r["result"]["batch_edits"],
                  "cycles": r["result"]["cycles"]} for r in runs],
        "targets": {"ratio_at_30_frames": TARGET_RATIO, "ranked_saving": TARGET_RANKED_SAVING},
        "seconds": round(time.perf_counter() - t_all, 1),
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/correction_effort.py",
                                                                 *(argv if argv is not None else sys.argv[1:])]),
    }
    result["met"] = judge(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, args.out / f"{args.name}.png")
    log.info("met: %s", result["met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
