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
import sys
from pathlib import Path
from typing import Any

from wbc_core.data.images import FORMATS_TEXT

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


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def cmd_annotate(args: argparse.Namespace) -> int:
    from serverless import main as function
    from serverless.model_handler import BadRequest, decode_image, probe_image
    from wbc_core.cvat_json import detection_to_cvat_json
    from wbc_core.data.cvat_xml import write_cvat_xml
    from wbc_core.data.types import AnnotatedDataset, ImageRecord
    from wbc_core.overlay import draw_overlay, save_png

    if args.bundle is None:
        from wbc_core.bundle import default_bundle_dir

        args.bundle = default_bundle_dir()
    context = make_context(logging.DEBUG if args.verbose else logging.INFO)
    try:
        model = function.init_model(context, args.bundle)
    except Exception:
        return 2  # init_model has logged the reason
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[ImageRecord] = []
    used: set[str] = set()
    failed = empty = 0
    for path in args.images:
        try:
            data = path.read_bytes()
            detection = model.detect(data, args.threshold)
        except OSError as exc:
            log.error("%s: cannot read (%s)", path, exc)
            failed += 1
            continue
        except BadRequest as exc:
            log.error("%s: %s", path, exc.message)
            failed += 1
            continue
        stem = _unique_stem(path, used)
        (args.out / f"{stem}.json").write_text(detection_to_cvat_json(detection, model.attributes))
        instances = [cell.to_instance() for cell in detection.cells]
        records.append(ImageRecord(name=path.name, width=detection.width, height=detection.height,
                                   instances=instances, frame_id=len(records)))
        info = probe_image(data, min_long_side=1008)
        picture = decode_image(data, info, min_long_side=1008)
        save_png(draw_overlay(picture, [], detection.cells, detection.width, detection.height),
                 args.out / f"{stem}_overlay.png")
        if detection.cells:
            log.info("%s: %d cells%s", path, len(detection.cells),
                     f" (capped: {detection.capped} more not returned)" if detection.capped else "")
        else:
            empty += 1
            log.warning("%s: no cells: %s", path, detection.empty_reason)
    if records:
        dataset = AnnotatedDataset(images=records, labels=model.labels, source="wbc-maskrcnn",
                                   meta={"label_types": dict.fromkeys(model.labels, "polygon")})
        write_cvat_xml(dataset, args.out / "annotations.xml", task_name="wbc-maskrcnn pre-annotations")
    cells = sum(len(r.instances) for r in records)
    print(f"{len(records)} slides, {cells} cells -> {args.out} (annotations.xml, <stem>.json, <stem>_overlay.png)"
          + (f"; {empty} slides with no cell (see the log for why)" if empty else "")
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def cmd_spec(args: argparse.Namespace) -> int:
    from serverless.spec import write_spec
    from wbc_core.bundle import load_bundle
    from wbc_core.contract import default_contract, spec_json

    contract = load_bundle(args.bundle).contract if args.bundle else default_contract()
    if not args.write:
        print(spec_json(contract.spec()))
        return 0
    for path in args.write:
        changed = write_spec(path, contract)
        print(f"{path}: {'spec written' if changed else 'spec already up to date'} "
              f"({len(contract.labels)} labels, attributes {sorted(contract.attribute_names)})")
    return 0


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
    annotate.add_argument("images", nargs="+", type=Path, help=f"slide images ({FORMATS_TEXT})")
    annotate.add_argument("--bundle", type=Path, default=None,
                          help="model bundle folder (bundle.yaml + model.pt), e.g. runs/seg1/bundle from "
                               "'python -m trainer train-segmenter' (default: $WBC_BUNDLE_DIR, else the starter "
                               "bundle shipped in models/starter)")
    annotate.add_argument("--out", type=Path, required=True, help="output folder (created)")
    annotate.add_argument("--threshold", type=_threshold, default=None,
                          help="score threshold in (0, 1], sent like CVAT's threshold (default: the bundle's)")
    annotate.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    annotate.set_defaults(func=cmd_annotate)
    spec = sub.add_parser(
        "spec", help="print or write the CVAT label spec of function.yaml from a model bundle",
        description="The function's CVAT label spec (metadata.annotations.spec: label names, type mask, attributes) "
                    "computed from a model bundle: the labels it can return and the attributes on its cells. "
                    "Without --bundle, the default bundle config (the 10 RV-PBS classes with a crop classifier), "
                    "which the committed function.yaml and function-gpu.yaml hold. deploy.sh writes it from the "
                    "bundle it deploys.",
        epilog="examples:\n  python -m serverless spec --bundle runs/seg1/bundle\n"
               "  python -m serverless spec --write function.yaml function-gpu.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    spec.add_argument("--bundle", type=Path, help="model bundle folder (default: the default bundle config)")
    spec.add_argument("--write", type=Path, nargs="+", metavar="YAML",
                      help="rewrite the spec block of these function yaml files in place (default: print the spec)")
    spec.set_defaults(func=cmd_spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
