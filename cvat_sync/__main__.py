"""``python -m cvat_sync``: pull finished CVAT annotation work into local training datasets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cvat_sync.client import CvatClient, CvatError, RetryPolicy
from cvat_sync.config import JOB_FILTERS, ConfigError, Settings, load_settings, parse_ratio, parse_size
from cvat_sync.pull import EXPORT_FORMATS, PullOptions, TaskReport, admitted, job_signature, printable, pull_tasks
from cvat_sync.store import StoreError, read_provenance
from wbc_core.split import SALT, VAL_FRACTION

log = logging.getLogger("cvat_sync")

CONNECTION = """
The server and credentials come from the environment or a config file readable only by you
(chmod 600), never from the command line:
  CVAT_URL=https://cvat.example.org
  CVAT_ACCESS_TOKEN=...            Personal Access Token (CVAT 2.3x+), or
  CVAT_TOKEN=...                   a legacy API key, or
  CVAT_USERNAME=... CVAT_PASSWORD=...
  CVAT_ORG=my-lab                  organization slug (optional)
Config file: --config FILE, $CVAT_SYNC_CONFIG or ~/.config/cvat_sync/config.yaml (same keys in
lower case without CVAT_: url, access_token, token, username, password, org, ca_bundle, out, jobs,
max_export_size, max_export_ratio).
"""

DESCRIPTION = """\
Pull annotated tasks from a CVAT server into datasets the trainer reads
(python -m trainer train-segmenter --data OUT/task-12).
""" + CONNECTION

PULL_DESCRIPTION = """\
Pull tasks (or every task of a project) from CVAT: the frames of admitted jobs at original quality
and their annotations, written as OUT/task-N/ (images/, annotations/instances_default.json in COCO 1.0,
cvat_sync.json provenance). Incremental (an unchanged task is not downloaded again; unchanged frames
are reused), resumable, and never half-written: the new dataset is swapped in only when complete.
The server's answers are checked before anything is written: frame names become paths inside images/
(/abs/x.jpg -> abs/x.jpg, ./x.jpg -> x.jpg; names with control characters, '..', or two frames sharing
one file are refused), frame numbers and sizes must fit the task, frames must be images, and an export
zip must stay within --max-export-size and --max-export-ratio. A refused or failed pull leaves --out as
it was (frames already downloaded stay in .staging-task-N when a rerun can finish the pull).
""" + CONNECTION

LIST_DESCRIPTION = """\
List the tasks the server shows you (id, name, project, frames, last update) and how many of each task's
jobs a pull would take under --jobs (not CVAT's own "completed" count, which needs the acceptance stage too).
Reads from the server only; writes nothing.
""" + CONNECTION

# what each --jobs rule admits, in the words of CVAT's job fields (see pull.admitted)
JOB_RULES = {"completed": "state=completed", "accepted": "state=completed, stage=acceptance",
             "all": "every annotation job"}

STATUS_DESCRIPTION = """\
Show the datasets pulled under --out (task, frames, shapes, job filter, when and from where), read
from their cvat_sync.json; with --check, also ask the server whether each task changed since. Writes
nothing.
""" + CONNECTION

RANK_DESCRIPTION = """\
Rank a task's unannotated frames by how unsure the model is about them, so the expert corrects first
the frames the next retrain learns most from (active learning). Each frame without annotations (and not
queued by an earlier ranking) is downloaded and run through the bundle's detect, plus a mirrored pass;
its score is a weighted count of near-threshold cells, segmenter-classifier disagreements, unsure class
calls and cells that do not survive the mirror. Writes OUT/ranking.json and OUT/ranking.csv, most
uncertain first. With --create-task K, also creates a new CVAT task (same labels and project) holding
the top K frames, ready for Automatic annotation and correction; its frames are recorded in
OUT/queued.json so the next ranking skips them. A fifth of those K frames (--val-fraction) are frames
that trainer retrain will hold out for its promotion gate (its split, by a hash of the image bytes),
spread over the ranking, so the first retrain after the corrections can gate and promote. On any
failure nothing is written (a half-made task is deleted) and the retrain registry is never touched.
""" + CONNECTION

EPILOG = """\
examples:
  python -m cvat_sync list
  python -m cvat_sync pull --task 12 --out data/cvat
  python -m cvat_sync pull --project 3 --jobs accepted
  python -m cvat_sync pull --task 12 --via export --format "CVAT for images 1.1"
  python -m cvat_sync status --check
  python -m cvat_sync rank --task 12 --bundle models/registry/current --create-task 10

exit codes: 0 done, 1 error, 2 bad settings or not a CVAT server, 3 credentials or permission,
4 task/project not found, 5 server unreachable after retries, 6 nothing usable to pull, an answer
refused as unsafe (frame names, impossible numbers, frames that are not images, zip bombs, oversized
bodies) or a local write problem (disk full, lock held), 130 interrupted (run the same command again
to finish).
"""


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="config file (default: $CVAT_SYNC_CONFIG or "
                                               "~/.config/cvat_sync/config.yaml)")
    p.add_argument("--org", help="organization slug (X-Organization); default: CVAT_ORG / config")
    p.add_argument("--ca-bundle", help="CA certificates file for a server with a private CA")
    p.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (not recommended)")
    p.add_argument("--retries", type=int, default=6, help="tries per call on connection errors, 429 and 5xx "
                                                          "(exponential backoff with jitter; default 6)")
    p.add_argument("--timeout", type=float, default=120.0, help="read timeout per call in seconds (default 120)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvat_sync", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("pull", help="pull tasks into local datasets (incremental, resumable)",
                       description=PULL_DESCRIPTION, formatter_class=raw, epilog=EPILOG)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", type=int, action="append", metavar="ID", help="task id (repeatable)")
    what.add_argument("--project", type=int, metavar="ID", help="every task of this project")
    p.add_argument("--out", type=Path, help="where datasets go (default: 'out' in the config, else data/cvat)")
    p.add_argument("--jobs", choices=JOB_FILTERS, help="whose frames: jobs in state completed (default), completed "
                                                       "and in the acceptance stage, or all jobs")
    p.add_argument("--via", choices=("api", "export"), default="api",
                   help="api: annotations JSON + frames (default, incremental); export: a CVAT dataset export zip")
    p.add_argument("--format", dest="export_format", choices=EXPORT_FORMATS, default="COCO 1.0",
                   help="export format for --via export (default: COCO 1.0)")
    p.add_argument("--dry-run", action="store_true", help="show what would be pulled; write nothing")
    p.add_argument("--workers", type=int, default=8, help="parallel frame downloads (default 8)")
    p.add_argument("--labels", type=Path, help="the trainer's label-map YAML to check labels against "
                                               "(default: the 10 RV-PBS classes)")
    p.add_argument("--strict-labels", action="store_true", help="fail on labels the label map does not know")
    p.add_argument("--skip-bad-frames", action="store_true", help="leave out frames that are not images "
                                                                  "instead of failing")
    p.add_argument("--max-export-size", metavar="SIZE",
                   help="--via export: refuse an export larger than this, zipped or unzipped (bytes, or "
                        "with K/M/G/T: 500M, 8G; default: max_export_size in the config, else 8G)")
    p.add_argument("--max-export-ratio", metavar="N",
                   help="--via export: refuse an export whose contents are over N times its zipped size (a zip "
                        "bomb; checked above 64 MiB; default: max_export_ratio in the config, else 200)")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _connection_args(p)

    ls = sub.add_parser("list", help="tasks on the server with their job states", description=LIST_DESCRIPTION,
                        formatter_class=raw, epilog=EPILOG)
    ls.add_argument("--project", type=int, help="only this project's tasks")
    ls.add_argument("--jobs", choices=JOB_FILTERS, help="count the jobs pull --jobs would take (default: 'jobs' in "
                                                        "the config, else completed)")
    _connection_args(ls)

    st = sub.add_parser("status", help="local datasets, and with --check whether the server has changes",
                        description=STATUS_DESCRIPTION, formatter_class=raw, epilog=EPILOG)
    st.add_argument("--out", type=Path, help="dataset folder (default: 'out' in the config, else data/cvat)")
    st.add_argument("--check", action="store_true", help="ask the server whether each task changed since its pull")
    _connection_args(st)

    rk = sub.add_parser("rank", help="rank a task's unannotated frames for correction (active learning)",
                        description=RANK_DESCRIPTION, formatter_class=raw, epilog=EPILOG)
    rk.add_argument("--task", type=int, required=True, metavar="ID", help="the task whose frames to rank")
    rk.add_argument("--bundle", type=Path, help="model bundle folder (default: the shipped starter, models/starter)")
    rk.add_argument("--out", type=Path, help="where ranking.json/.csv and queued.json go (default: "
                                             "data/rank/task-ID)")
    rk.add_argument("--create-task", type=int, default=0, metavar="K",
                    help="create a CVAT task with the top K frames (default 0: only write the ranking)")
    rk.add_argument("--task-name", help="name of the created task (default: '<task name>: next K by uncertainty')")
    rk.add_argument("--threshold", type=float, help="score threshold (default: the bundle's served threshold)")
    rk.add_argument("--no-mirror", action="store_true", help="skip the mirrored pass (half the time, one signal "
                                                             "less)")
    rk.add_argument("--weight", action="append", default=[], metavar="SIGNAL=W",
                    help="weight of a signal in the score (repeatable; default 1 each). The signals are those of "
                         "wbc_core/uncertainty.py (near_threshold, low_score, flip_outline, ...); a wrong name is "
                         "refused with the full list")
    rk.add_argument("--density-power", type=float, metavar="P",
                    help="score = uncertainty x typicality ** P, where typicality (0-1] says how much a frame's "
                         "cells look like the task's other cells to the model (default 2; 0: uncertainty only, "
                         "which with few corrected frames tends to pick outliers)")
    rk.add_argument("--val-fraction", type=float, default=VAL_FRACTION, metavar="F",
                    help=f"share of the --create-task frames that are validation-side frames of the retrain split "
                         f"(default {VAL_FRACTION:g}; set it to retrain.yaml's split.val_fraction; 0: the top K "
                         "whatever their side)")
    rk.add_argument("--split-salt", default=SALT, metavar="S",
                    help="the retrain split's salt (retrain.yaml's split.salt; default %(default)s)")
    rk.add_argument("--no-progress", action="store_true", help="no progress bar")
    _connection_args(rk)
    return parser


def _retry(args: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(attempts=max(1, args.retries), read_timeout=args.timeout)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.org:
        settings.org = args.org
    if args.ca_bundle:
        settings.ca_bundle = args.ca_bundle
    if args.insecure:
        settings.insecure = True
    return settings


def _summary(reports: list[TaskReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"task {r.task_id} ({r.name}): {r.status}, {r.frames} frames "
                     f"({r.downloaded} downloaded, {r.reused} reused, {r.image_bytes / 1e6:.1f} MB) -> {r.out_dir}")
        if r.jobs:
            lines.append(f"  jobs: {r.jobs.get('admitted', 0)} of {r.jobs.get('total', 0)} admitted")
        if r.shapes:
            lines.append("  shapes: " + ", ".join(f"{k} {v}" for k, v in sorted(r.shapes.items())))
        for reason, n in sorted(r.skipped_frames.items()):
            lines.append(f"  frames left out: {n} {reason}")
        for reason, n in sorted(r.skipped_shapes.items()):
            lines.append(f"  shapes left out: {n} {reason}")
        if r.unknown_labels:
            lines.append("  labels unknown to the label map: " + ", ".join(
                f"{k} {v}" for k, v in sorted(r.unknown_labels.items())))
    return "\n".join(lines)


def cmd_pull(args: argparse.Namespace) -> int:
    from wbc_core.labels import LabelMap

    settings = _settings(args)
    max_bytes = (parse_size(args.max_export_size, "--max-export-size") if args.max_export_size is not None
                 else settings.max_export_bytes)
    max_ratio = (parse_ratio(args.max_export_ratio, "--max-export-ratio") if args.max_export_ratio is not None
                 else settings.max_export_ratio)
    options = PullOptions(out=args.out or settings.out, jobs=args.jobs or settings.jobs, via=args.via,
                          export_format=args.export_format, dry_run=args.dry_run, workers=max(1, args.workers),
                          label_map=LabelMap.from_yaml(args.labels) if args.labels else LabelMap(),
                          strict_labels=args.strict_labels, skip_bad_frames=args.skip_bad_frames,
                          progress=not args.no_progress and sys.stderr.isatty(),
                          max_export_bytes=max_bytes, max_export_ratio=max_ratio)
    with CvatClient(settings, retry=_retry(args), pool_size=max(8, options.workers)) as client:
        version = client.server_version()
        log.info("CVAT %s at %s (%s%s)", version, settings.url, settings.auth_kind,
                 f", organization {settings.org}" if settings.org else "")
        if args.project is not None:
            from cvat_sync.pull import Puller

            task_ids = Puller(client, options).project_tasks(args.project)
            log.info("project %d: tasks %s", args.project, task_ids)
        else:
            task_ids = list(dict.fromkeys(args.task))
        reports = pull_tasks(client, task_ids, options)
        requests_made = client.requests_made
    text = _summary(reports)
    sys.stdout.write(text + f"\n{requests_made} requests\n")
    if args.summary_json:
        args.summary_json.write_text(json.dumps({"tasks": [r.to_dict() for r in reports],
                                                 "requests": requests_made}, indent=1) + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Tasks with the number of jobs ``pull --jobs RULE`` would take: counted from the jobs themselves with
    the rule pull uses (:func:`cvat_sync.pull.admitted`), not from the task's ``jobs.completed`` (CVAT counts
    only jobs that are completed *and* in the acceptance stage there)."""
    settings = _settings(args)
    rule = args.jobs or settings.jobs
    with CvatClient(settings, retry=_retry(args)) as client:
        version = client.server_version()
        params = {"project_id": args.project} if args.project is not None else {}
        tasks = list(client.paginate("/api/tasks", params, what="tasks"))
        by_task: dict[object, list[dict]] = {}
        for job in client.paginate("/api/jobs", params, what="jobs"):  # one listing for all tasks
            if isinstance(job, dict):
                by_task.setdefault(job.get("task_id"), []).append(job)
        rows = []
        for task in tasks:
            jobs = by_task.get(task.get("id"), [])
            taken = sum(admitted(j, rule) for j in jobs)
            project, name = task.get("project_id") or "-", printable(str(task.get("name", "")), 40)
            rows.append(f"{task.get('id')!s:>6}  {name:<40}  project {project!s:<5}  "
                        f"{task.get('size', 0) or 0!s:>5} frames  {taken}/{len(jobs)} jobs pull would take "
                        f"(--jobs {rule}: {JOB_RULES[rule]})  updated {str(task.get('updated_date', ''))[:19]}")
    sys.stdout.write(f"CVAT {version} at {settings.url}: {len(rows)} tasks\n" + "\n".join(rows) + "\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    out = args.out
    settings = None
    if out is None or args.check:
        try:
            settings = _settings(args)
        except ConfigError:
            if args.check:
                raise
        out = out or (settings.out if settings else Path("data/cvat"))
    folders = sorted(p for p in Path(out).glob("task-*") if p.is_dir())
    if not folders:
        sys.stdout.write(f"no pulled tasks under {out}\n")
        return 0
    client = CvatClient(settings, retry=_retry(args)) if args.check and settings else None
    try:
        for folder in folders:
            prov = read_provenance(folder)
            if prov is None:
                sys.stdout.write(f"{folder}: no provenance (not written by cvat_sync?)\n")
                continue
            task = prov["task"]
            line = (f"{folder}: task {task['id']} ({printable(str(task.get('name')))}), "
                    f"{len(prov.get('frames', []))} frames, "
                    f"{sum(prov.get('shapes', {}).values())} shapes, jobs {prov.get('jobs_filter')}, "
                    f"pulled {prov.get('pulled_at')} from {prov.get('server')}")
            if client is not None:
                current = client.get_json(f"/api/tasks/{task['id']}", what=f"task {task['id']}")
                jobs = list(client.paginate("/api/jobs", {"task_id": task["id"]}, what=f"jobs of task {task['id']}"))
                recorded = prov.get("signature") or {}
                changed = (current.get("updated_date") != recorded.get("updated_date")
                           or job_signature(jobs) != recorded.get("jobs"))
                line += "; CHANGED on the server (pull again)" if changed else "; up to date"
            sys.stdout.write(line + "\n")
    finally:
        if client is not None:
            client.close()
    return 0


def _weights(items: list[str]) -> dict[str, float]:
    from wbc_core.uncertainty import DEFAULT_WEIGHTS

    weights = dict(DEFAULT_WEIGHTS)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in weights:
            raise ConfigError(f"--weight {item!r}: use SIGNAL=W with SIGNAL one of {', '.join(weights)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--weight {item!r}: {value!r} is not a number") from None
    return weights


def cmd_rank(args: argparse.Namespace) -> int:
    from cvat_sync.rank import RankOptions, rank_task
    from wbc_core.bundle import STARTER_DIR, BundleError, load_bundle
    from wbc_core.detect import Predictor

    if args.create_task < 0:
        raise ConfigError("--create-task must be 0 (none) or a number of frames")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"--threshold {args.threshold}: a score between 0 and 1")
    if args.density_power is not None and not 0 <= args.density_power <= 10:
        raise ConfigError(f"--density-power {args.density_power}: a number from 0 (uncertainty only) to 10")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction {args.val_fraction}: from 0 to below 1, as retrain.yaml's "
                          "split.val_fraction")
    weights = _weights(args.weight)
    settings = _settings(args)
    bundle_dir = args.bundle or STARTER_DIR
    try:
        bundle = load_bundle(bundle_dir)
    except (BundleError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the bundle {bundle_dir}: {exc}") from None
    predictor = Predictor(bundle)
    out = args.out or Path("data/rank") / f"task-{args.task}"
    options = RankOptions(out=out, create_task=args.create_task, mirror=not args.no_mirror, threshold=args.threshold,
                          weights=weights, progress=not args.no_progress and sys.stderr.isatty(),
                          task_name=args.task_name, val_fraction=args.val_fraction, salt=args.split_salt,
                          **({} if args.density_power is None else {"density_power": args.density_power}))
    with CvatClient(settings, retry=_retry(args)) as client:
        client.server_version()
        record = rank_task(client, args.task, predictor, options)
    top = record["ranking"][:10]
    lines = [f"task {record['task']} ({record['task_name']}): {record['frames_ranked']} frames ranked "
             f"({record['frames_annotated']} already annotated) in {record['seconds']:.0f} s; highest score first "
             f"(uncertainty x typicality ** {record['density_power']:g}):"]
    lines += [f"  {r['rank']:>4}  frame {r['frame']:>5}  {r['name']:<40}  score {r['score']}  "
              f"(uncertainty {r['uncertainty']}, typicality {r['typicality']}, {r['split']})" for r in top]
    created = record.get("created_task")
    if created:
        lines.append(f"created task {created['id']} ({created['name']}) with {len(created['frames'])} frames, "
                     f"{created['validation_frames']} of them validation-side")
    lines.append(f"written: {out / 'ranking.json'}, {out / 'ranking.csv'}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"pull": cmd_pull, "list": cmd_list, "status": cmd_status, "rank": cmd_rank}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (CvatError, StoreError) as exc:
        log.error("%s", exc)
        return int(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        log.error("interrupted; nothing was half-written. Run the same command again to finish (frames already "
                  "downloaded are reused)")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
