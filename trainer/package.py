"""Package a model bundle for shipping: half-precision weights, provenance, a size limit, all or nothing.

``python -m trainer package-bundle runs/starter/bundle models/starter --half --max-mb 25`` copies a verified
bundle to a new folder with the floating-point tensors of the segmenter and the crop classifier stored as
float16 (half the bytes; they are cast back to float32 when the bundle is loaded, so inference runs exactly as
before up to fp16 rounding of the weights), extra provenance merged into ``bundle.yaml``, and fresh checksums.
The result is written beside the destination and renamed into place only after it loads and its size is
within ``--max-mb``: an interrupted or refused packaging leaves the old folder as it was.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when packaging runs, so --help stays instant
    import torch

log = logging.getLogger(__name__)


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float16; integer buffers (e.g. BatchNorm's counters) unchanged."""
    import torch

    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v) for k, v in state.items()}


def weights_mb(directory: Path) -> float:
    """Megabytes (10^6 bytes) of the weights files (``*.pt``) in a bundle folder."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.pt")) / 1e6


def package_bundle(src: str | Path, dst: str | Path, half: bool = True, provenance: dict[str, Any] | None = None,
                   max_mb: float | None = None, rbc_px: float | None = None, threshold: float | None = None) -> Path:
    """Copy the bundle ``src`` to ``dst`` (replaced as a whole), segmenter weights in float16 when ``half``,
    ``provenance`` merged into its provenance. Refuses (``BundleError``) when the weights exceed ``max_mb``.

    Serving settings (the weights untouched; each change is recorded in the provenance's ``serving``): ``rbc_px``,
    the red-cell diameter the input is scaled to (red-cell scale mode only), and ``threshold``, the default score
    threshold (``benchmarks/serving_sweep.py`` chooses both on validation splits)."""
    import torch
    import yaml

    from wbc_core.atomic import atomic_torch_save, atomic_write_bytes, sha256_file
    from wbc_core.bundle import BUNDLE_FILE, SEGMENTER_FILE, BundleError, load_bundle

    src, dst = Path(src), Path(dst)
    bundle = load_bundle(src)  # verifies every checksum first
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        meta = yaml.safe_load((src / BUNDLE_FILE).read_text())
        state = torch.load(bundle.segmenter_path, map_location="cpu", weights_only=True)
        seg_file = staging / SEGMENTER_FILE
        atomic_torch_save(half_state(state) if half else state, seg_file)
        meta["segmenter"]["file"] = SEGMENTER_FILE
        meta["segmenter"]["sha256"] = sha256_file(seg_file)
        meta["segmenter"]["dtype"] = "float16" if half else "float32"
        if bundle.classifier_path is not None:
            cls_file = staging / bundle.classifier_path.name
            cls_state = torch.load(bundle.classifier_path, map_location="cpu", weights_only=True)
            atomic_torch_save(half_state(cls_state) if half else cls_state, cls_file)
            meta["classifier"]["sha256"] = sha256_file(cls_file)
            meta["classifier"]["dtype"] = "float16" if half else "float32"
        meta["provenance"] = {**(meta.get("provenance") or {}), **(provenance or {})}
        serving = {}
        if rbc_px is not None:
            scale = (meta.get("preprocessing") or {}).get("scale") or {}
            if scale.get("mode") != "rbc":
                raise BundleError(f"{src}: --rbc-px needs a bundle in the red-cell scale mode "
                                  "(preprocessing.scale.mode: rbc)")
            if not 8 <= rbc_px <= 256:
                raise BundleError(f"--rbc-px {rbc_px:g}: give a red-cell diameter between 8 and 256 px")
            serving["rbc_px"] = {"from": scale.get("rbc_px"), "to": float(rbc_px)}
            scale["rbc_px"] = float(rbc_px)
        if threshold is not None:
            if not 0 < threshold <= 1:
                raise BundleError(f"--threshold {threshold:g}: give a score threshold in (0, 1]")
            serving["score_threshold"] = {"from": meta.get("score_threshold"), "to": float(threshold)}
            meta["score_threshold"] = float(threshold)
        if serving:
            meta["provenance"]["serving"] = {**(meta["provenance"].get("serving") or {}), **serving}
        atomic_write_bytes(staging / BUNDLE_FILE, yaml.safe_dump(meta, sort_keys=False).encode())
        size = weights_mb(staging)
        if max_mb is not None and size > max_mb:
            raise BundleError(f"the packaged weights of {src} take {size:.1f} MB, over the limit of {max_mb} MB"
                              + ("" if half else "; try --half"))
        load_bundle(staging).build_segmenter()  # it must load as it will be served
        staging.chmod(0o755)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
            dst.rename(old / dst.name)
            staging.rename(dst)
            shutil.rmtree(old)
        else:
            staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("packaged %s -> %s (%.1f MB of weights%s)", src, dst, weights_mb(dst), ", fp16" if half else "")
    return dst


DESCRIPTION = """\
Copy a model bundle to a folder for shipping or deployment: the segmenter's weights in half precision (float16,
half the size; loaded back as float32), checksums recomputed, extra provenance merged, checked to load and to
fit a size limit. The destination is replaced as a whole, or left as it was when anything fails."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="bundle folder to package (bundle.yaml + model.pt [+ classifier.pt])")
    p.add_argument("dst", type=Path, help="folder to write (replaced as a whole), e.g. models/starter")
    p.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                   help="store the segmenter in float16 (default: yes; --no-half keeps float32)")
    p.add_argument("--max-mb", type=float, default=None, help="refuse when the weights exceed this many MB")
    p.add_argument("--rbc-px", type=float, default=None,
                   help="serve with red cells this many px across at the input (red-cell scale mode; see "
                        "benchmarks/serving_sweep.py, which chooses it on validation splits)")
    p.add_argument("--threshold", type=float, default=None, help="the bundle's default score threshold, in (0, 1]")


def run(args: argparse.Namespace) -> int:
    dst = package_bundle(args.src, args.dst, half=args.half, max_mb=args.max_mb, rbc_px=args.rbc_px,
                         threshold=args.threshold)
    print(f"packaged bundle: {dst} ({weights_mb(dst):.1f} MB of weights)")
    return 0
