"""Run the CVAT detector locally, through exactly the code Nuclio runs.

Each slide is sent as the request CVAT would send (``{"image": <base64>, "threshold": T}``, as a
Nuclio event with ``Content-Type: application/json``) to ``main.handler`` with a real nuclio-sdk
``Context``; what comes back is what CVAT would get.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("serverless")

EPILOG = """\
outputs (in --out):
  <stem>.json          the function's response body for that slide: the JSON list CVAT receives
                       (mask = flat 0/255 crop + inclusive [xtl, ytl, xbr, ybr]; points = polygon)
  <stem>_overlay.png   the returned masks drawn on the slide, with label and confidence
  annotations.xml      all slides as CVAT for images 1.1 polygons: upload it to a CVAT task holding the
                       same images (Actions > Upload annotations > CVAT 1.1) to review it there

examples:
  python -m serverless annotate slide1.jpg slide2.jpg --bundle runs/seg1/bundle --out preannotations/
  WBC_BUNDLE_DIR=runs/seg1/bundle python -m serverless annotate photos/*.jpg --out out/ --threshold 0.7
"""


def build_event(body: bytes, content_type: str = "application/json") -> Any:
    """A nuclio-sdk ``Event`` built by the SDK's own deserializer from an HTTP request's body.

    As in the processor, an ``application/json`` body arrives as a dict (bytes if it is not valid
    JSON) and any other content type as bytes.
    """
    import nuclio_sdk

    message = {
        "body": body, "content_type": content_type, "trigger": {"kind": "http", "name": "myHttpTrigger"},
        "fields": {}, "headers": {"Content-Type": content_type}, "id": "local", "method": "POST", "path": "/",
        "size": len(body), "timestamp": int(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        "url": "", "shard_id": 0, "num_shards": 0, "type": "", "type_version": "", "version": "",
    }
    return nuclio_sdk.Event.deserialize(message, kind=nuclio_sdk.EventDeserializerKinds.msgpack)


def make_context(level: int = logging.INFO) -> Any:
    """A nuclio-sdk ``Context`` whose logger writes human-readable lines to stderr."""
    import nuclio_sdk
    import nuclio_sdk.logger

    logger = nuclio_sdk.Logger(level, name="wbc-maskrcnn")
    logging.getLogger("wbc-maskrcnn").propagate = False  # its own handler below; no duplicates via root
    logger.set_handler("default", sys.stderr, nuclio_sdk.logger.HumanReadableFormatter())
    return nuclio_sdk.Context(logger=logger)


def request_body(image: bytes, threshold: float | None) -> bytes:
    """The JSON body CVAT sends for one frame (``threshold`` only when it is truthy, as CVAT does)."""
    payload: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii")}
    if threshold:
        payload["threshold"] = threshold
    return json.dumps(payload).encode()


def _cells_from_results(results: list[dict]) -> list:
    """Results back into pipeline ``Cell`` objects (for the overlay), decoded with CVAT's rules."""
    from trainer.data.masks import decode_cvat_function_mask
    from trainer.predict import Cell

    cells = []
    for item in results:
        crop, (xtl, ytl, xbr, ybr) = decode_cvat_function_mask(item["mask"])
        cells.append(Cell(label=item["label"], score=float(item.get("confidence") or 0.0),
                          box=(float(xtl), float(ytl), float(xbr + 1), float(ybr + 1)), mask_crop=crop,
                          origin=(xtl, ytl)))
    return cells


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def cmd_annotate(args: argparse.Namespace) -> int:
    import numpy as np

    from serverless import main as function
    from serverless.model_handler import decode_image, probe_image
    from trainer.data.cvat_xml import write_cvat_xml
    from trainer.data.types import AnnotatedDataset, ImageRecord, Instance
    from trainer.overlay import draw_overlay, save_png

    if args.bundle is None:
        raise SystemExit(f"no model bundle: pass --bundle DIR or set {function.BUNDLE_ENV}")
    context = make_context(logging.DEBUG if args.verbose else logging.INFO)
    try:
        model = function.init_model(context, args.bundle)
    except Exception:
        return 2  # init_model has logged the reason
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    used: set[str] = set()
    failed = 0
    for path in args.images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("%s: cannot read (%s)", path, exc)
            failed += 1
            continue
        response = function.handler(context, build_event(request_body(data, args.threshold)))
        if response.status_code != 200:
            log.error("%s: HTTP %d %s", path, response.status_code, response.body)
            failed += 1
            continue
        stem = _unique_stem(path, used)
        (args.out / f"{stem}.json").write_text(response.body)
        results = json.loads(response.body)
        info = probe_image(data)
        instances = [Instance(label=r["label"], polygon=np.asarray(r["points"], dtype=np.float64).reshape(-1, 2),
                              source="auto", score=float(r["confidence"])) for r in results]
        records.append(ImageRecord(name=path.name, width=info.width, height=info.height, instances=instances,
                                   frame_id=len(records)))
        picture = decode_image(data, info, min_long_side=1008)
        save_png(draw_overlay(picture, [], _cells_from_results(results), info.width, info.height),
                 args.out / f"{stem}_overlay.png")
        log.info("%s: %d cells", path, len(results))
    if records:
        dataset = AnnotatedDataset(images=records, labels=model.classes, source="wbc-maskrcnn",
                                   meta={"label_types": dict.fromkeys(model.classes, "polygon")})
        write_cvat_xml(dataset, args.out / "annotations.xml", task_name="wbc-maskrcnn pre-annotations")
    cells = sum(len(r.instances) for r in records)
    print(f"{len(records)} slides, {cells} cells -> {args.out} (annotations.xml, <stem>.json, <stem>_overlay.png)"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serverless", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    annotate = sub.add_parser("annotate", help="pre-annotate slide images with the CVAT function, locally",
                              description=__doc__, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    annotate.add_argument("images", nargs="+", type=Path, help="slide images (JPEG, PNG, BMP or TIFF)")
    env_bundle = os.environ.get("WBC_BUNDLE_DIR") or None
    annotate.add_argument("--bundle", type=Path, default=Path(env_bundle) if env_bundle else None,
                          help="model bundle folder (bundle.yaml + model.pt), e.g. runs/seg1/bundle from "
                               "'python -m trainer train-segmenter' (default: $WBC_BUNDLE_DIR)")
    annotate.add_argument("--out", type=Path, required=True, help="output folder (created)")
    annotate.add_argument("--threshold", type=_threshold, default=None,
                          help="score threshold in (0, 1], sent like CVAT's threshold (default: the bundle's)")
    annotate.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    annotate.set_defaults(func=cmd_annotate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
