"""Train the Mask R-CNN segmenter (flat and readable, in the spirit of torchvision's references/detection).

Resumable: a checkpoint (model, optimiser, schedule, step, RNG) is written atomically every
``checkpoint_every`` steps, at an epoch end when the last epoch-end one is ``checkpoint_every`` steps old (every
epoch end when it is 0, or with ``on_epoch_end``), and when training ends; ``resume=True`` continues from it
exactly where the order of batches left off. The loss plot is redrawn with the epoch-end checkpoints: a lab's
first fine-tune runs 3-step epochs, and a checkpoint and a plot after each cost 35 s of a 3-minute cycle.

One DataLoader serves every epoch and its worker lives across them (a new worker each epoch cost the first step
of every 3-step epoch of a lab's first fine-tune 2-3 s): the sampler tags each index with its epoch
(:class:`EpochTagged`), which sets the augmentation draw.

Cells whose CVAT source is in ``train.mask_skip_sources`` (the retrain: ``auto``, the function's outline left
untouched) train the RPN and box/class heads but not the mask head (:mod:`trainer.mask_loss`).

The run directory holds ``losses.csv``, ``loss_curve.png``, ``checkpoint.pt``, ``config.yaml`` and finally
``bundle/`` (see :mod:`wbc_core.bundle`).

Several training sets (:mod:`trainer.multiset`) come as one dataset whose ``meta`` says which set each frame
is from (``frame_set``), each set's sampling weight (``sets[i]["weight"]``) and which frames have boxes only
(``frame_box_only``). Batches are then drawn one set at a time (:class:`SetBatchSampler`), so a batch is
either all outlined or all box-only, and box-only batches run with the mask branch switched off
(:func:`mask_branch_disabled`): they train the RPN and the box/class heads and give no ``loss_mask``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from trainer.config import OptimConfig, TrainConfig
from trainer.data.segmentation_dataset import SegmentationDataset, collate
from trainer.mask_loss import mask_loss_weights
from wbc_core.atomic import atomic_torch_save, atomic_write_bytes
from wbc_core.bundle import write_bundle
from wbc_core.data.types import AnnotatedDataset, DatasetError
from wbc_core.model import WeightsError, build_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PRECISE_BN_EPOCH = 1_000_003  # the augmentation draw of precise_batchnorm's images (no training run gets there)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way (for exact resume).

    Under DistributedDataParallel every rank draws the same permutation (padded by wrapping around to a
    multiple of ``world`` so every rank takes the same number of steps) and takes every ``world``-th item
    from position ``rank``; ``start`` counts items of this rank's share.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.rank, self.world = rank, world

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _share(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        padded = order + order[: (-len(order)) % self.world]
        return padded[self.rank::self.world]

    def __iter__(self):
        return iter(self._share()[self.start:])

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) - self.start


class SetBatchSampler(Sampler[list[int]]):
    """Batches that each come from one group of frames (a training set, or outlined vs box-only frames).

    Each batch's group is drawn with probability proportional to ``weights[group]``; within a group the frames
    come in a seeded permutation that starts over when used up, so a small set with a large weight repeats
    within an epoch. A repeated frame is yielded as ``index + k * n`` for its k-th repeat (the dataset reads
    ``index % n``) so it gets its own augmentation. An epoch has as many batches as :class:`EpochSampler`
    would give. Under DDP every rank draws the same global batch of ``batch_size * world`` frames from the
    same group and takes every ``world``-th, so all ranks run the same heads at each step.
    """

    def __init__(self, groups: Sequence[int], weights: Sequence[float], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.n = len(groups)
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(int(g), []).append(i)
        self.ids = [g for g in sorted(members) if g < len(weights) and float(weights[g]) > 0]
        if not self.ids:
            raise ValueError(f"no group of frames has a positive sampling weight (weights {list(weights)})")
        p = np.array([float(weights[g]) for g in self.ids])
        self.p = p / p.sum()
        self.members = members
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        self.steps = math.ceil(math.ceil(self.n / world) / batch_size)

    def set_position(self, epoch: int, start: int) -> None:
        """Epoch and the number of this epoch's batches already done."""
        self.epoch, self.start = epoch, start

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch (the same on every call)."""
        rng = np.random.default_rng([self.seed, self.epoch, 0x5E75])
        picks = rng.choice(len(self.ids), size=self.steps, p=self.p)
        order: dict[int, np.ndarray] = {}
        cursor: dict[int, int] = {}
        rounds: dict[int, int] = {}
        batches = []
        for k in picks:
            g = self.ids[int(k)]
            members = self.members[g]
            take = []
            while len(take) < self.batch_size * self.world:
                if cursor.get(g, len(members)) >= len(members):
                    order[g], cursor[g], rounds[g] = rng.permutation(len(members)), 0, rounds.get(g, -1) + 1
                take.append(members[int(order[g][cursor[g]])] + rounds[g] * self.n)
                cursor[g] += 1
            batches.append(take[self.rank::self.world])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.epoch_batches()[self.start:])

    def __len__(self) -> int:
        return self.steps - self.start


class EpochTagged(Sampler):
    """``inner``'s indices (or batches of indices) as ``(epoch, index)``, the epoch being ``inner.epoch`` when the
    iteration starts: the dataset takes its augmentation draw from it, so a DataLoader can keep its workers
    across epochs (they never see :meth:`SegmentationDataset.set_epoch`)."""

    def __init__(self, inner: EpochSampler | SetBatchSampler) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[Any]:
        epoch = self.inner.epoch
        for item in self.inner:
            yield [(epoch, i) for i in item] if isinstance(item, list) else (epoch, item)

    def __len__(self) -> int:
        return len(self.inner)


@contextmanager
def mask_branch_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (a torchvision Mask R-CNN) without its mask branch: ``RoIHeads.has_mask()`` is False while
    ``mask_roi_pool`` is None, so the heads neither need ``masks`` in the targets nor compute ``loss_mask``,
    and the mask head gets no gradient. The RoI pooler has no weights, so the state dict is unchanged."""
    heads = model.roi_heads
    saved = heads.mask_roi_pool
    heads.mask_roi_pool = None
    try:
        yield
    finally:
        heads.mask_roi_pool = saved


def _batch_groups(data: AnnotatedDataset, dataset: SegmentationDataset) -> tuple[list[int], list[float]] | None:
    """Per-frame group and per-group weight when batches must be grouped (several sets or box-only frames)."""
    frame_set = data.meta.get("frame_set")
    if frame_set is not None:
        if len(frame_set) != len(data.images):
            raise DatasetError(f"{data.source}: meta['frame_set'] has {len(frame_set)} entries for "
                               f"{len(data.images)} frames")
        sets = data.meta.get("sets") or []
        weights = [float(s.get("weight", 1.0)) for s in sets] or [1.0] * (max(frame_set) + 1)
        for g in range(len(weights)):
            flags = {dataset.box_only[i] for i, s in enumerate(frame_set) if s == g}
            if len(flags) > 1:
                raise DatasetError(f"{data.source}: set {g} mixes box-only and outlined frames; give each its own set")
        return [int(s) for s in frame_set], weights
    if any(dataset.box_only):
        groups = [int(b) for b in dataset.box_only]
        return groups, [float(groups.count(0)), float(groups.count(1))]
    return None


def trainable_cells(data: AnnotatedDataset, dataset: SegmentationDataset) -> int:
    """Cells that are targets: outlined ones in outlined frames, every boxed one in box-only frames."""
    return sum(sum(1 for i in rec.instances if i.box is not None) if box_only else len(rec.outlined())
               for rec, box_only in zip(data.images, dataset.box_only, strict=True))


@dataclass
class Distributed:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_kind: str) -> Distributed:
    """Join the process group ``torchrun`` set up (env ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): NCCL on GPUs,
    gloo on CPU. The same command trains on one CPU, several GPUs or several nodes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    ctx = Distributed(rank=dist.get_rank(), world=dist.get_world_size(),
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    log.info("distributed training: rank %d of %d (%s)", ctx.rank, ctx.world, dist.get_backend())
    return ctx


TRIM_ABOVE_MB = 3200
"""Freed heap goes back to the OS (after any step) only while the trainer's resident set is above this. glibc keeps
freed pages when tensor shapes vary step to step (scale jitter, rotations), so on 4032x3024 slides RSS creeps past
the 4 GB target; trimming keeps it at 3.7 GB there (benchmarks/train_memory.py). Each trim makes the next step
fault its working set in again: trimming every 5 steps whatever the size cost BCCD's 640x480 frames (under 3 GB
resident) 6% of a step (1.82 s against 1.71 s), part of the steps the 58-minute in-domain run lost."""


def _resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _malloc_trimmer(above_mb: float = TRIM_ABOVE_MB) -> Callable[[], None]:
    """A function that returns glibc's freed heap to the OS when the resident set is over ``above_mb`` (reading
    it costs microseconds). No-op off glibc/Linux."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _resident_mb()
    except (OSError, AttributeError, ValueError):
        return lambda: None

    def trim() -> None:
        if _resident_mb() > above_mb:
            libc.malloc_trim(0)

    return trim


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def epochs_to_run(opt: OptimConfig, steps_per_epoch: int) -> int:
    """``opt.epochs``, raised when that many epochs would run fewer than ``opt.min_steps`` steps; with
    ``opt.max_steps``, just enough epochs for that many steps."""
    if opt.max_steps > 0:
        return math.ceil(opt.max_steps / max(1, steps_per_epoch))
    if opt.min_steps <= 0:
        return opt.epochs
    return max(opt.epochs, math.ceil(opt.min_steps / max(1, steps_per_epoch)))


def steps_to_run(opt: OptimConfig, steps_per_epoch: int) -> int:
    """The steps the learning-rate schedule spans: ``opt.max_steps``, else whole epochs."""
    return opt.max_steps if opt.max_steps > 0 else steps_per_epoch * epochs_to_run(opt, steps_per_epoch)


@torch.no_grad()
def precise_batchnorm(model: torch.nn.Module, dataset: SegmentationDataset, frames: int, batch_size: int,
                      device: torch.device, progress: bool = False) -> int:
    """Recompute every BatchNorm layer's running mean and variance as the plain average over ``frames`` training
    images, drawn as training draws them (augmented, in batches of ``batch_size``: the statistics the weights were
    trained under) but with fresh draws of their own, instead of the moving average of the last few batches
    ("precise BN", as detectron2's PreciseBN hook; Wu & Johnson 2021). Weights are untouched. Returns the images
    used (0: no BatchNorm layer, or ``frames`` is 0).

    Not over unaugmented frames: tried on the shipped starter, statistics of 16 plain BCCD frames at the served
    scale raised its held-back edits from 0.21 to 0.31 of from-scratch."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    n = len(dataset.records)
    if not norms or frames <= 0 or n == 0:
        return 0
    # a draw of its own (an epoch training never reaches), the same every time: a run repeats
    order = np.random.default_rng(PRECISE_BN_EPOCH).permutation(max(frames, n))[:frames] % n
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
        m.train()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="precise BN", unit="batch", disable=not progress,
                          leave=False):
            images = [dataset[(PRECISE_BN_EPOCH, int(i))][0].to(device) for i in order[start:start + batch_size]]
            batched = model.transform.batch_images([model.transform.normalize(im) for im in images],
                                                   size_divisible=model.transform.size_divisible)
            model.backbone(batched)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(order)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay. With a time limit the decay follows whichever of steps or
    time is further along, so a time-limited run still ends on a fully decayed learning rate."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / max(1, warmup)
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def plot_losses(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in rows[0] if k.startswith("loss")]
    for k in keys:  # loss_mask is empty on box-only steps: each curve has the steps that have it
        have = [r for r in rows if r.get(k) not in (None, "")]
        if not have:
            continue
        steps = np.array([int(r["step"]) for r in have])
        vals = np.array([float(r[k]) for r in have])
        win = max(1, len(vals) // 50)
        smooth = np.convolve(vals, np.ones(win) / win, mode="valid")
        ax.plot(steps[win - 1:], smooth, label=k, lw=1.5 if k == "loss" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    ax.set_title("segmenter training loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)


def train_segmenter(cfg: TrainConfig, train_data: AnnotatedDataset, out_dir: Path, resume: bool = False,
                    on_epoch_end: Callable[[int, float, Path], dict[str, Any] | None] | None = None,
                    progress: bool = True, provenance: dict[str, Any] | None = None,
                    rbc_estimator: Callable[[np.ndarray], Any] | None = None) -> Path:
    """Train and write ``out_dir/bundle``. Returns the bundle directory.

    ``on_epoch_end(epoch, train_seconds, bundle_dir)`` (optional) is called after each epoch with a
    fresh bundle written; its returned metrics are logged to ``curve.csv`` (time spent in it is not
    counted as training time). ``provenance`` (optional) is added to the bundle's provenance (e.g. the
    training sets and their licences). ``rbc_estimator`` replaces ``wbc_core.scale.estimate_rbc_diameter``
    for the ``rbc`` scale mode. See the module docstring for several sets and box-only frames.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opt = cfg.train
    if opt.threads:
        torch.set_num_threads(opt.threads)
    random.seed(opt.seed)
    np.random.seed(opt.seed)
    torch.manual_seed(opt.seed)

    dataset = SegmentationDataset(train_data, cfg.labels, cfg.model.max_size, cfg.model.min_size,
                                  augment=cfg.augment, seed=opt.seed, scale=cfg.scale, rbc_estimator=rbc_estimator,
                                  mask_skip_sources=opt.mask_skip_sources)
    n_cells = trainable_cells(train_data, dataset)
    log_mask_skips(train_data, dataset)
    if not train_data.images or n_cells == 0:
        what = "cells" if any(dataset.box_only) else "outlined cells"
        raise DatasetError(f"{train_data.source or 'training data'} has no frames with {what} "
                           f"({len(train_data.images)} frames): nothing to train on")
    if all(dataset.box_only):
        log.warning("every training frame has boxes only: the mask head stays untrained; add a set with outlines")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opt.device == "auto" else opt.device)
    ddp = init_distributed(device.type)
    if ddp.active and device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    progress = progress and ddp.main
    groups = _batch_groups(train_data, dataset)
    sampler: EpochSampler | SetBatchSampler
    if groups is None:
        sampler = EpochSampler(len(dataset), opt.seed, ddp.rank, ddp.world)
    else:
        sampler = SetBatchSampler(groups[0], groups[1], opt.batch_size, opt.seed, ddp.rank, ddp.world)
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / ddp.world) / opt.batch_size)
    dataset.prepare_scale(progress=progress)
    epochs = epochs_to_run(opt, steps_per_epoch)
    total_steps = steps_to_run(opt, steps_per_epoch)

    model = build_model(cfg.model, len(cfg.labels.classes)).to(device)
    jitter = sorted({int(round(cfg.model.min_size * s / 16) * 16) for s in opt.scale_jitter} - {cfg.model.min_size})
    model.transform.min_size = (*jitter, cfg.model.min_size)
    # rbc scale mode: the dataset already sized each frame by its red cells; the model must not resize it again
    model.transform._skip_resize = cfg.scale.mode == "rbc"
    net: torch.nn.Module = model  # what forward/backward go through (DDP when distributed)
    if ddp.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    optimizer = make_optimizer(model, cfg)
    step, epoch, train_seconds = 0, 0, 0.0
    ckpt_path = out_dir / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        saved = ckpt.get("config", {}).get("model", {})
        if saved.get("backbone") != cfg.model.backbone:
            raise WeightsError(f"checkpoint {ckpt_path} is from backbone {saved.get('backbone')!r} but the config "
                               f"asks for {cfg.model.backbone!r}; resume with the same config or use a new --out")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise WeightsError(f"checkpoint {ckpt_path} does not fit this model: {str(exc)[:300]}") from exc
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, train_seconds = ckpt["step"], ckpt["epoch"], ckpt["train_seconds"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, epoch)
    elif ckpt_path.exists():
        raise FileExistsError(f"{out_dir} already holds a training run; pass --resume to continue it or use a "
                              "new --out directory")
    if ddp.main:
        atomic_write_bytes(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    loss_csv = out_dir / "losses.csv"
    loss_fields = ["step", "epoch", "seconds", "lr", "loss", "loss_classifier", "loss_box_reg", "loss_mask",
                   "loss_objectness", "loss_rpn_box_reg"]
    if ddp.main and (not loss_csv.exists() or not resume):
        with loss_csv.open("w", newline="") as fh:
            csv.writer(fh).writerow(loss_fields)

    def save_checkpoint() -> None:
        if not ddp.main:
            return
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                           "epoch": epoch, "train_seconds": train_seconds, "config": cfg.to_dict(),
                           "torch_rng": torch.get_rng_state()}, ckpt_path)

    log.info("training %s on %d frames (%d cells, %d box-only frames), %d epochs x %d steps, batch %d, %s",
             cfg.model.backbone, len(dataset), n_cells, sum(dataset.box_only), epochs, steps_per_epoch,
             opt.batch_size, f"limit {opt.max_minutes} min" if opt.max_minutes else "no time limit")
    if opt.max_steps:
        log.info("exactly %d steps (train.max_steps)%s", opt.max_steps,
                 f"; the {opt.max_minutes} min limit only caps it" if opt.max_minutes else "")
    elif epochs > opt.epochs:
        log.info("%d epochs instead of %d: at least %d steps (train.min_steps)", epochs, opt.epochs, opt.min_steps)
    bundle_dir = out_dir / "bundle"
    trim = _malloc_trimmer()
    stop = False
    # its own generator: each iterator draws a worker seed, which must not move the global RNG that samples
    # proposals (a resumed run creates the iterator at another epoch than the straight run did)
    loading = {"collate_fn": collate, "num_workers": opt.num_workers, "persistent_workers": opt.num_workers > 0,
               "generator": torch.Generator().manual_seed(opt.seed)}
    if isinstance(sampler, SetBatchSampler):
        loader = DataLoader(dataset, batch_sampler=EpochTagged(sampler), **loading)
    else:
        loader = DataLoader(dataset, batch_size=opt.batch_size, sampler=EpochTagged(sampler), **loading)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    epoch_end_saved = step
    while epoch < epochs and not stop and not (opt.max_steps and step >= opt.max_steps):
        start_in_epoch = step - epoch * steps_per_epoch
        dataset.set_epoch(epoch)
        sampler.set_position(epoch, start_in_epoch * (1 if isinstance(sampler, SetBatchSampler) else opt.batch_size))
        net.train()
        t_last = time.perf_counter()
        for images, targets in loader:
            for g in optimizer.param_groups:
                # a fixed step count keeps the schedule on steps: the clock must not change the model
                time_progress = (train_seconds / (opt.max_minutes * 60) if opt.max_minutes and not opt.max_steps
                                 else 0.0)
                g["lr"] = opt.lr * lr_factor(step, total_steps, opt.warmup_steps, opt.min_lr_ratio, time_progress)
            if device.type != "cpu":
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with_masks = ["masks" in t for t in targets]
            if any(with_masks) and not all(with_masks):
                raise RuntimeError("a batch mixes outlined and box-only frames; group them (SetBatchSampler)")
            weights = [t.pop("mask_weights", None) for t in targets]
            if not all(with_masks):
                heads = mask_branch_disabled(model)
            elif any(w is not None for w in weights):
                heads = mask_loss_weights(weights)
            else:
                heads = nullcontext()
            with heads:
                losses = net(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr "
                                         f"(now {opt.lr}) or check the annotations")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opt.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
            optimizer.step()
            step += 1
            now = time.perf_counter()
            train_seconds += now - t_last
            t_last = now
            if ddp.main:
                with loss_csv.open("a", newline="") as fh:
                    csv.writer(fh).writerow([step, epoch, f"{train_seconds:.2f}",
                                             f"{optimizer.param_groups[0]['lr']:.3g}", f"{loss.item():.5f}"]
                                            + [f"{losses[k].item():.5f}" if k in losses else ""
                                               for k in loss_fields[5:]])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            trim()
            if opt.checkpoint_every and step % opt.checkpoint_every == 0:
                save_checkpoint()
            if opt.max_steps and step >= opt.max_steps:
                stop = True
                break
            if opt.max_minutes and _any_rank(train_seconds >= opt.max_minutes * 60, ddp):
                (log.warning if opt.max_steps else log.info)(
                    "time limit of %.1f min reached at step %d%s", opt.max_minutes, step,
                    f" of the {opt.max_steps} asked for (train.max_steps)" if opt.max_steps else "")
                stop = True
                break
        if not stop:
            epoch += 1
        due = not opt.checkpoint_every or step - epoch_end_saved >= opt.checkpoint_every
        if due or stop or epoch >= epochs or on_epoch_end is not None:
            save_checkpoint()
            if ddp.main:
                plot_losses(loss_csv, out_dir / "loss_curve.png")
            epoch_end_saved = step
        if on_epoch_end is not None and ddp.main:
            model.eval()
            _write(model, cfg, bundle_dir, train_data, step, epoch, train_seconds, cells=n_cells, extra=provenance)
            on_epoch_end(epoch, train_seconds, bundle_dir)
        _barrier(ddp)
    bar.close()
    del loader  # its worker: not needed to write the bundle
    _sync_buffers(model, ddp)
    if opt.precise_bn_frames:
        t_bn = time.perf_counter()
        used = precise_batchnorm(model, dataset, opt.precise_bn_frames, opt.batch_size, device, progress)
        if used:
            log.info("BatchNorm statistics recomputed over %d augmented training images in %.1f s "
                     "(train.precise_bn_frames)",
                     used, time.perf_counter() - t_bn)
    model.eval()
    if ddp.main:
        _write(model, cfg, bundle_dir, train_data, step, epoch, train_seconds, world=ddp.world, cells=n_cells,
               extra=provenance)
        log.info("wrote bundle %s after %d steps (%.1f min of training)", bundle_dir, step, train_seconds / 60)
    _barrier(ddp)
    return bundle_dir


def log_mask_skips(data: AnnotatedDataset, dataset: SegmentationDataset) -> None:
    """Say how many outlined cells the mask head will not learn from (``train.mask_skip_sources``), and warn when
    that is all of them."""
    if not dataset.mask_skip_sources:
        return
    outlined = [c for rec, box_only in zip(data.images, dataset.box_only, strict=True) if not box_only
                for c in rec.outlined()]
    skipped = sum(c.source in dataset.mask_skip_sources for c in outlined)
    if outlined and skipped == len(outlined):
        log.warning("all %d outlined cells have a source in %s: they train finding cells, and the mask head "
                    "learns no outline this run (correct or redraw some cells in CVAT)", skipped,
                    list(dataset.mask_skip_sources))
    elif skipped:
        log.info("mask loss on %d of %d outlined cells: %d have a source in %s (outlines the model drew itself)",
                 len(outlined) - skipped, len(outlined), skipped, list(dataset.mask_skip_sources))


def _any_rank(flag: bool, ddp: Distributed) -> bool:
    """``flag`` OR-ed over all ranks, so every rank stops at the same step (no rank left waiting)."""
    if not ddp.active:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sync_buffers(model: torch.nn.Module, ddp: Distributed) -> None:
    """BatchNorm running statistics from rank 0 on every rank. DDP gradients keep the parameters equal,
    but each rank updates its buffers on its own batches after DDP's per-forward broadcast."""
    if ddp.active:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def _barrier(ddp: Distributed) -> None:
    if ddp.active:
        import torch.distributed as dist

        dist.barrier()


def _write(model: torch.nn.Module, cfg: TrainConfig, bundle_dir: Path, data: AnnotatedDataset, step: int,
           epoch: int, train_seconds: float, world: int = 1, cells: int | None = None,
           extra: dict[str, Any] | None = None) -> None:
    provenance = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "training_data": data.source,
        "frames": len(data.images),
        "cells": cells if cells is not None else sum(len(r.outlined()) for r in data.images),
        "steps": step,
        "epochs": epoch,
        "train_seconds": round(train_seconds, 1),
        "processes": world,
        "torch": str(torch.__version__),
        **(extra or {}),
    }
    write_bundle(bundle_dir, model, cfg.labels.classes, cfg.model, cfg.score_threshold, provenance=provenance,
                 scale=cfg.scale.bundle_dict())
