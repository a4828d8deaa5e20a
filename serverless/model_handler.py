"""The CVAT detector behind the Nuclio function: request in, CVAT mask shapes out.

``handle`` is the whole per-request path (``main.handler`` only delegates here, and the local CLI
``python -m serverless annotate`` runs it too):

1. :func:`parse_request`: the body CVAT sends is ``{"image": <base64>, "threshold": <float>}``
   (``threshold`` only when truthy). ``event.body`` is a dict when the request said
   ``Content-Type: application/json`` and raw bytes otherwise; both are accepted.
2. :func:`probe_image`: the header is read with PIL, without decoding, to reject unsupported formats,
   images under :data:`MIN_SIDE` px and decompression bombs over :data:`MAX_PIXELS`. A truncated
   JPEG is refused by the decoder itself (libjpeg through PIL, which, unlike OpenCV, does not hand
   back a half-grey image).
3. :class:`ModelHandler` runs :class:`wbc_core.detect.Predictor`, the pipeline evaluation and the
   benchmarks use. JPEGs go through ``predict_bytes`` (OpenCV's reduced-size JPEG decode, EXIF
   orientation applied); PNG/BMP/TIFF/WebP are decoded with PIL (EXIF orientation applied; grey,
   palette, RGBA and 16-bit images become 8-bit RGB).
4. :func:`to_cvat_json`: one ``mask`` shape per cell, with ``mask`` = flat 0/255 crop + inclusive
   ``[xtl, ytl, xbr, ybr]`` in frame coordinates and ``points`` = a polygon of the same cell
   (CVAT stores that one when "convert masks to polygons" is on, and its AI-tools dialog needs it).

Bad input is answered 400 with ``{"error": "..."}``; anything else that fails is a 500 with a
short message, and the traceback goes to the function log only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import math
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wbc_core.bundle import BUNDLE_FILE, CLASSIFIER_FILE, SEGMENTER_FILE, Bundle
from wbc_core.contract import MAX_RESPONSE_BYTES, Contract, check_spec, spec_attribute_names
from wbc_core.cvat_json import detection_to_cvat_json_within
from wbc_core.data.images import (
    ACCEPTED_FORMATS,
    FORMATS_TEXT,
    JPEG_FORMATS,
    ImageReadError,
    decode_memory_bytes,
    decode_rgb,
    oriented,
    pil_to_rgb8,
)
from wbc_core.detect import Detection, Predictor

log = logging.getLogger(__name__)

#: Smallest accepted image side (px); below this there is no cell to find.
MIN_SIDE = 32
#: Largest accepted image (declared width x height). RV-PBS photos are 12.2 MP.
MAX_PIXELS = 120_000_000
#: Most memory one request's decode may take (:func:`wbc_core.data.images.decode_memory_bytes`: pixels x bytes
#: per pixel of the stored mode and of the conversion to 8-bit RGB; JPEGs are decoded reduced). A 12 MP 8-bit
#: PNG takes 85 MB, a 48 MP one 340 MB; a 16-bit or float TIFF/PNG costs more per pixel. function.yaml's memory
#: limit is this plus the model's resident memory (benchmarks/results/hostile.json measures both).
MAX_DECODE_BYTES = 768 * 2**20
#: Seconds between two checks for a changed bundle (0: every request; negative: never).
RELOAD_ENV = "WBC_RELOAD_SECONDS"
DEFAULT_RELOAD_SECONDS = 5.0
REQUEST_HELP = f'send JSON {{"image": "<base64 of a {FORMATS_TEXT} image>", "threshold": 0.5}}'


class BadRequest(ValueError):
    """The request cannot be served as sent; the message says what was wrong (answered with 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def reload_interval() -> float:
    """``$WBC_RELOAD_SECONDS`` as a float (default 5; a bad value is warned about and ignored)."""
    value = os.environ.get(RELOAD_ENV, "").strip()
    if not value:
        return DEFAULT_RELOAD_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        log.warning("%s=%r is not a number; checking for a new bundle every %s s", RELOAD_ENV, value,
                    DEFAULT_RELOAD_SECONDS)
        return DEFAULT_RELOAD_SECONDS
    return seconds if math.isfinite(seconds) else -1.0


def bundle_identity(directory: str | Path) -> tuple[Any, ...]:
    """What identifies the bundle in a folder without reading it: its real path (a ``current`` symlink is
    followed) and the (mtime_ns, size) of ``bundle.yaml``, ``model.pt`` and ``classifier.pt`` (None if
    missing), so a copy that completes after a failed load is tried again."""
    real = os.path.realpath(directory)
    stats: list[tuple[int, int] | None] = []
    for name in (BUNDLE_FILE, SEGMENTER_FILE, CLASSIFIER_FILE):
        try:
            st = os.stat(os.path.join(real, name))
            stats.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stats.append(None)
    return (real, *stats)


def _bundle_version(predictor: Predictor) -> str:
    """A short name for the served bundle: its folder name (a registry version such as v0003)."""
    return predictor.bundle.directory.name or str(predictor.bundle.directory)


# --- request ------------------------------------------------------------------------------

def parse_request(body: dict | bytes | bytearray | str | None) -> tuple[bytes, float | None]:
    """``(image_bytes, threshold)`` from the request body; threshold None means the bundle's default.

    Raises :class:`BadRequest` for an empty or non-JSON body, a missing or non-base64 ``image``,
    and a ``threshold`` that is not a number in [0, 1]. Unknown keys are ignored.
    """
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body.strip()):
        raise BadRequest(f"empty request body; {REQUEST_HELP}")
    if isinstance(body, (bytes, bytearray, str)):
        try:
            text = body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body
            body = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"request body is not JSON ({exc}); {REQUEST_HELP}") from exc
        except RecursionError as exc:  # e.g. [[[[...]]]] 100,000 deep: a bad request, not a server error
            raise BadRequest(f"request body is JSON nested too deeply to parse; {REQUEST_HELP}") from exc
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}; {REQUEST_HELP}")
    if "image" not in body:
        raise BadRequest(f"request has no 'image' key (keys: {sorted(map(str, body))[:10]}); {REQUEST_HELP}")
    image = _decode_base64(body["image"])
    return image, _parse_threshold(body.get("threshold"))


def _decode_base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"'image' must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # tolerate a data URL ("data:image/jpeg;base64,...")
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # `base64` wraps lines at 76 characters
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"'image' is not valid base64 ({exc})") from exc
    if not data:
        raise BadRequest("'image' is empty")
    return data


def _parse_threshold(value: Any) -> float | None:
    """None/0/"" -> None (CVAT sends the threshold only when it is truthy); else a float in (0, 1]."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"'threshold' must be a number between 0 and 1, got {value!r}")
    try:
        threshold = float(value)
    except ValueError as exc:
        raise BadRequest(f"'threshold' must be a number between 0 and 1, got {value!r}") from exc
    if not math.isfinite(threshold) or threshold < 0 or threshold > 1:
        raise BadRequest(f"'threshold' must be between 0 and 1, got {value!r}")
    return threshold or None


# --- image --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    """What the header says: PIL format name, the frame size after EXIF orientation and PIL's pixel mode."""

    format: str
    width: int
    height: int
    mode: str = "RGB"


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) from the header; a PNG's eXIf chunk is read only if it precedes the pixels."""
    try:
        if img.format == "PNG":  # PngImageFile.getexif() would decode the whole image to find a late eXIf
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(0x0112, 1))
    except Exception:  # a broken EXIF block: the decoders ignore it as well
        return 1


def probe_image(data: bytes, min_long_side: int | None = None) -> ImageInfo:
    """Check an upload from its header (no full decode); raises :class:`BadRequest`.

    Rejects non-images and unsupported formats, images under ``MIN_SIDE`` px, images declaring more than
    ``MAX_PIXELS`` and images whose decode would take more than ``MAX_DECODE_BYTES`` (JPEGs decoded reduced to
    a long side of at least ``min_long_side``), before anything is decoded. Truncation is found by the decoder.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadRequest(f"image is too large (decompression bomb?): {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequest(f"'image' is not a readable image ({len(data)} bytes; expected {FORMATS_TEXT}): "
                         f"{exc}") from exc
    with img:
        fmt = str(img.format or "")
        width, height = img.size
        if fmt not in ACCEPTED_FORMATS:
            raise BadRequest(f"unsupported image format {fmt or 'unknown'}; send {FORMATS_TEXT}")
        if width * height > MAX_PIXELS:
            raise BadRequest(f"image is {width}x{height} = {width * height / 1e6:.0f} megapixels, over the "
                             f"{MAX_PIXELS / 1e6:.0f} MP limit (decompression bomb?); downscale it")
        if min(width, height) < MIN_SIDE:
            raise BadRequest(f"image is {width}x{height}; both sides must be at least {MIN_SIDE} px")
        mode = str(img.mode)
        need = decode_memory_bytes(fmt, mode, width, height, min_long_side)
        if need > MAX_DECODE_BYTES:
            raise BadRequest(f"decoding this {width}x{height} {fmt} image ({mode} pixels) would take "
                             f"{need / 2**20:.0f} MB, over the {MAX_DECODE_BYTES / 2**20:.0f} MB limit; send it "
                             "as an 8-bit RGB JPEG or PNG, or downscale it")
        orientation = _orientation(img)
        if fmt == "TIFF":  # newer Pillow reports a TIFF's size already oriented: start from the stored size
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                width, height = int(img.tag_v2[256]), int(img.tag_v2[257])
    if orientation in (5, 6, 7, 8):  # EXIF orientations that swap width and height
        width, height = height, width
    return ImageInfo(fmt, width, height, mode)


def decode_image(data: bytes, info: ImageInfo | None = None, min_long_side: int | None = None) -> np.ndarray:
    """Decode an upload to RGB uint8 with EXIF orientation applied (raises :class:`BadRequest`).

    JPEGs use the trainer's decoder (OpenCV, reduced to the cheapest size whose long side is still
    ``>= min_long_side``); other formats are decoded in full with PIL.
    """
    info = info or probe_image(data)
    if info.format in JPEG_FORMATS:
        try:
            rgb, _ = decode_rgb(data, min_long_side=min_long_side)
        except ImageReadError as exc:
            raise BadRequest(str(exc)) from exc
        return rgb
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return pil_to_rgb8(oriented(img))  # transposed copy only when EXIF asks for one
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRequest(f"{info.format} image is truncated or corrupt ({exc}); upload the complete file") from exc


def _json_response(context: Any, payload: Any, status_code: int) -> Any:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return context.Response(body=body, headers={}, content_type="application/json", status_code=status_code)


class ModelHandler:
    """Wraps one :class:`Predictor` (one model per Nuclio worker process) and swaps it for a new bundle.

    Hot reload: at the start of :meth:`handle`, at most every ``reload_seconds`` (``$WBC_RELOAD_SECONDS``,
    default 5; 0 = every request; negative = never), the bundle folder's identity is compared with the
    one being served: the folder's real path (``WBC_BUNDLE_DIR`` may be a registry's ``current``
    symlink) and the mtime and size of ``bundle.yaml``, ``model.pt`` and ``classifier.pt``. When it
    changed, a new :class:`Predictor` is loaded from the real path (checksums verified), warmed up and
    swapped in; the request that noticed pays for that. If the new bundle cannot be loaded (half
    copied, corrupt), one error line is logged and the old model keeps serving; it is tried again only
    once the identity changes again. A new bundle that could return labels the function's spec does not
    declare is refused the same way (CVAT would drop those shapes).

    ``spec``: the function's label spec (``function.yaml``'s ``annotations.spec``). The bundle is checked
    against it (:class:`wbc_core.contract.SpecMismatch` at start-up), and only the attributes it declares are
    returned. None: no check, every attribute of the bundle's contract.
    """

    def __init__(self, bundle: str | Path | Bundle, device: str | None = None, reload_seconds: float | None = None,
                 warmup_on_reload: bool = True, spec: list[dict[str, Any]] | None = None) -> None:
        self.bundle_dir = Path(bundle.directory if isinstance(bundle, Bundle) else bundle)
        self.device = device
        self.reload_seconds = reload_interval() if reload_seconds is None else float(reload_seconds)
        self.warmup_on_reload = warmup_on_reload
        identity = bundle_identity(self.bundle_dir)  # taken first: a change during the load is seen next time
        self.spec = spec
        self.predictor = Predictor(bundle if isinstance(bundle, Bundle) else identity[0], device=device)
        self._check_spec(self.predictor.bundle.contract)
        self._served = identity   # identity of the bundle being served
        self._seen = identity     # last identity tried (served, or failed to load)
        self._next_check = time.monotonic() + max(self.reload_seconds, 0.0)
        self.last_reload_error: str | None = None
        self.last_timings: dict[str, float] = {}
        self.max_response_bytes = MAX_RESPONSE_BYTES

    def _check_spec(self, contract: Contract) -> None:
        if self.spec is not None:
            check_spec(contract, self.spec)

    @property
    def attributes(self) -> frozenset[str]:
        """The cell attributes returned to CVAT: those the spec declares (all of the bundle's without a spec)."""
        names = self.predictor.bundle.contract.attribute_names
        return names if self.spec is None else names & spec_attribute_names(self.spec)

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def labels(self) -> list[str]:
        """Every label the served bundle can return (its contract)."""
        return list(self.predictor.bundle.contract.labels)

    @property
    def default_threshold(self) -> float:
        return self.predictor.default_threshold

    @property
    def bundle_path(self) -> Path:
        """The resolved bundle folder being served (e.g. ``/models/v0003`` for ``/models/current``)."""
        return Path(self._served[0])

    @staticmethod
    def _warmup(predictor: Predictor) -> None:
        size = (predictor.min_size, predictor.max_size, 3)
        predictor.detect(np.zeros(size, dtype=np.uint8), threshold=1.0)

    def warmup(self) -> None:
        """One inference on a blank frame, so the first real request does not pay for lazy init."""
        self._warmup(self.predictor)

    def maybe_reload(self, logger: Any = None, force: bool = False) -> bool:
        """Swap in the bundle at :attr:`bundle_dir` if it changed (see the class doc); True if swapped.

        Never raises: a bundle that fails to load is logged (``logger``: a Nuclio or ``logging`` logger)
        and the current model keeps serving. ``force`` checks now, even when reloading is off.
        """
        logger = logger or log
        if not force:
            if self.reload_seconds < 0:
                return False
            now = time.monotonic()
            if now < self._next_check:
                return False
            self._next_check = now + self.reload_seconds
        try:
            identity = bundle_identity(self.bundle_dir)
            if identity == self._seen:
                return False
            self._seen = identity
            predictor = Predictor(identity[0], device=self.device)
            self._check_spec(predictor.bundle.contract)
            if self.warmup_on_reload:
                self._warmup(predictor)
        except Exception as exc:
            self.last_reload_error = " ".join(f"{type(exc).__name__}: {exc}".split())
            logger.error(f"cannot reload the WBC model bundle from {self.bundle_dir} -> {self._seen[0]}; still "
                         f"serving {self.bundle_path}: {self.last_reload_error}")
            return False
        old_path, old_version = self.bundle_path, _bundle_version(self.predictor)
        self.predictor = predictor  # one reference assignment: a request uses either the old or the new model
        self._served = identity
        self.last_reload_error = None
        logger.info(f"WBC model bundle reloaded: {old_path} ({old_version}) -> {self.bundle_path} "
                    f"({_bundle_version(predictor)}), classes={len(predictor.classes)}, "
                    f"default_threshold={predictor.default_threshold}")
        return True

    def detect(self, data: bytes, threshold: float | None = None) -> Detection:
        """Validate and decode an upload, then run the ``detect`` contract (raises :class:`BadRequest`)."""
        predictor = self.predictor  # one model for the whole request
        info = probe_image(data, predictor.decode_side)
        if info.format in JPEG_FORMATS:
            try:
                return predictor.detect(data, threshold)
            except ImageReadError as exc:
                raise BadRequest(str(exc)) from exc
        t0 = time.perf_counter()
        image = decode_image(data, info)
        detection = predictor.detect(image, threshold)
        detection.timings["decode"] = time.perf_counter() - t0 - sum(detection.timings.values())
        return detection

    def infer(self, body: dict | bytes | bytearray | str | None) -> tuple[str, Detection]:
        """Request body -> (CVAT results as JSON text, the detection); raises :class:`BadRequest`.

        :attr:`last_timings` then holds the seconds spent in each stage of this request: ``parse``
        (JSON + base64), ``decode``, ``resize``, ``model``, ``masks`` (upsampling to native
        resolution), ``classify``, ``polygons`` and ``encode`` (CVAT mask JSON).
        """
        self.last_timings = {}
        t0 = time.perf_counter()
        data, threshold = parse_request(body)
        parse = time.perf_counter() - t0
        detection = self.detect(data, threshold)
        t1 = time.perf_counter()
        text, left_out = detection_to_cvat_json_within(detection, self.max_response_bytes, self.attributes)
        if left_out:
            log.warning("response budget: %d of %d cells returned (%.0f MB, the limit is %.0f MB); the %d "
                        "lowest-scoring left out", len(detection.cells) - left_out, len(detection.cells),
                        len(text) / 2**20, self.max_response_bytes / 2**20, left_out)
            detection.cells = detection.cells[:len(detection.cells) - left_out]
            detection.capped += left_out
        self.last_timings = {"parse": parse, **detection.timings, "encode": time.perf_counter() - t1}
        return text, detection

    def handle(self, context: Any, event: Any) -> Any:
        """Serve one Nuclio event; always returns a ``context.Response`` (never a bare list).

        A changed bundle is picked up first (:meth:`maybe_reload`)."""
        self.maybe_reload(context.logger)
        start = time.perf_counter()
        try:
            body, detection = self.infer(event.body)
        except BadRequest as exc:
            context.logger.warn_with("bad request", error=exc.message)
            return _json_response(context, {"error": exc.message}, 400)
        except Exception as exc:
            context.logger.error_with("annotation failed", error=type(exc).__name__,
                                      traceback=traceback.format_exc())
            return _json_response(context, {"error": f"internal error ({type(exc).__name__}) while annotating "
                                                     "the image; see the function logs"}, 500)
        ms = round((time.perf_counter() - start) * 1000, 1)
        if detection.cells:
            context.logger.info_with("annotated", shapes=len(detection.cells), capped=detection.capped, ms=ms)
        else:
            context.logger.info_with("annotated: no shapes", reason=detection.empty_reason, ms=ms)
        return _json_response(context, body, 200)
