"""Run the CVAT stand-in by hand: ``python -m tests.cvat_standin --port 8080 --task-from-xml BASOPHILS.xml``."""

from __future__ import annotations

import argparse
import logging
import time

from tests.cvat_standin import StandinCVAT, task_from_cvat_xml

log = logging.getLogger("tests.cvat_standin")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cvat_standin", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", default="2.23.1", help="CVAT version to act as (2.32.0+: newer API)")
    parser.add_argument("--user", default="admin", help="admin user name (password: --password)")
    parser.add_argument("--password", default="admin")
    parser.add_argument("--task-from-xml", action="append", default=[], metavar="XML",
                        help="add a task from a CVAT for images 1.1 XML (repeatable)")
    parser.add_argument("--frame-size", default="1008x756", help="WxH of the synthetic frames, or 'native'")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--segment-size", type=int, default=None)
    parser.add_argument("--export-polls", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    size = None if args.frame_size == "native" else tuple(int(v) for v in args.frame_size.lower().split("x"))
    cvat = StandinCVAT(args.host, args.port, version=args.version, export_polls=args.export_polls,
                       admin=(args.user, args.password))
    for path in args.task_from_xml:
        tid = task_from_cvat_xml(cvat, path, size, max_frames=args.max_frames,  # type: ignore[arg-type]
                                 segment_size=args.segment_size)
        log.info("task %d from %s", tid, path)
    with cvat:
        log.info("serving %s (user %r, token %s); Ctrl-C stops", cvat.url, args.user, cvat.admin_token)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stopping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
