"""Training the crop classifier: source-only, target-only, finetune and DANN, and the target protocol.

Methods (``--method``):

- ``source-only``: trained on the labelled source crops only (the naive transfer the paper measured at 0.21);
- ``target-only``: trained on the labelled target crops only (K per class with ``--few-shot K``);
- ``finetune``: pre-trained on the source, then fine-tuned on the labelled target crops (target classes the
  source lacks get their head rows from the target labels only);
- ``dann``: domain-adversarial training (Ganin & Lempitsky 2015) on labelled source + unlabelled target
  crops: a discriminator tells the domains apart from the features through a gradient-reversal layer whose
  weight rises from 0 to ``dann.weight`` (``w * (2 / (1 + exp(-gamma p)) - 1)``, p = training progress), so
  the features become domain-invariant. Labelled target crops (``--few-shot K``), when given, join the
  class loss. The discriminator's accuracy, loss and gradient norm are logged every epoch and checked for
  the two collapses the paper's run showed (see :func:`dann_health`). Aligning the *marginal* feature
  distributions is wrong when the class mix differs (balanced source batches vs a target that is 60%
  neutrophils: some source class must then be mapped onto target neutrophils), so target batches are drawn
  balanced over the model's own predictions, refreshed every epoch (``dann.balance_target``). Afterwards
  BatchNorm statistics are re-estimated on the target crops (AdaBN), since the model will only ever see
  target cells.

Every method can normalise colour first (``stain_norm``: Reinhard or Macenko to the target reference, see
:mod:`wbc_core.classifier.stain`). Class imbalance is handled by class-balanced sampling: every batch draws
classes uniformly, then a crop of that class.

**Target protocol** (:func:`split_target`): the labelled pool is a fixed, seeded set of target *frames*
(up to ``pool_per_class`` cells per class, at most ``pool_fraction`` of a class, optionally only from one
split, e.g. BCCD's trainval); every other labelled target crop is the evaluation set, the same for every
method and draw. Frames never straddle the two, and augmentation happens on the fly, so no copy of an
evaluation cell is ever trained on. ``--few-shot K`` draws K pool cells per class (all when fewer), with
``draws`` fixed seeds; metrics are reported per draw and as mean and spread.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from trainer.classifier import METHODS
from trainer.classifier.augment import AugmentConfig, augment_batch
from trainer.classifier.evaluate import classification_metrics, summarise_draws
from trainer.classifier.sources import CropSet
from wbc_core.classifier.crops import CropConfig, apply_mask
from wbc_core.classifier.infer import CLASSIFIER_CONFIG_VERSION, CellClassifier, MergeConfig, predict_proba, tta_views
from wbc_core.classifier.model import CellNet, NetConfig, grad_reverse, standardise, to_unit
from wbc_core.classifier.stain import METHODS as STAIN_METHODS
from wbc_core.classifier.stain import StainNormalizer
from wbc_core.config_io import check_known, dataclass_from_dict, read_yaml_mapping
from wbc_core.data.types import DatasetError
from wbc_core.labels import RVPBS_LABELS

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "classifier.yaml"


# --- configuration -------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    batch_size: int = 64
    source_steps: int = 700        # source-only, finetune's pre-training and dann
    target_steps: int = 300        # target-only
    finetune_steps: int = 150      # finetune, after the source pre-training
    lr: float = 2.0e-3             # AdamW, cosine decay with a 5% warm-up
    finetune_lr: float = 3.0e-4
    weight_decay: float = 5.0e-4
    label_smoothing: float = 0.1
    epoch_steps: int = 50          # steps per logged "epoch"
    threads: int = 0               # torch intra-op threads; 0 = all cores
    tta: bool | int = 1            # views averaged at prediction time: 1, 2 (+ h-flip), 4 (rotations), 8 (all)
    seed: int = 0
    device: str = "cpu"            # cpu | cuda | auto (crops stay in host memory; batches go to the device)

    def __post_init__(self) -> None:
        self.tta = tta_views(self.tta)  # refuses anything but 1, 2, 4, 8 (or true/false) early, naming the key


@dataclass
class DannConfig:
    weight: float = 1.0            # final gradient-reversal weight
    gamma: float = 10.0            # how fast the weight rises
    adabn: bool = True             # re-estimate BatchNorm statistics on target crops after training
    balance_target: bool = True    # sample target batches balanced over the model's current predictions


@dataclass
class ProtocolConfig:
    pool_per_class: int | None = 20    # labelled pool: at most this many cells per class ...
    pool_fraction: float = 0.6         # ... and at most this fraction of a class's cells (rounded)
    pool_split: str | None = "trainval"  # draw the pool only from frames of this split (when the target has splits)
    draws: int = 5                     # few-shot draws (seeds 0..draws-1)
    seeds: int = 1                     # training seeds for rows without a draw (K = 0, all labels)
    unlabelled: str = "all"            # DANN's unlabelled target crops: all (labels unused) | pool
    headline: list[str] | None = None  # classes of the headline macro-F1 (default: all present)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unlabelled not in ("all", "pool"):
            raise ValueError(f"protocol.unlabelled must be 'all' or 'pool', not {self.unlabelled!r}")
        if not 0 < self.pool_fraction <= 1:
            raise ValueError(f"protocol.pool_fraction must be in (0, 1], got {self.pool_fraction}")


@dataclass
class ClassifierConfig:
    crop: CropConfig = field(default_factory=CropConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dann: DannConfig = field(default_factory=DannConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    stain_norm: str = "none"
    source_map: str | None = None      # class-map YAML for class-folder sources (default: the packaged PBC map)

    def __post_init__(self) -> None:
        if self.stain_norm not in STAIN_METHODS:
            raise ValueError(f"stain_norm must be one of {STAIN_METHODS}, not {self.stain_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"crop": self.crop.to_dict(), "net": self.net.to_dict(), "train": asdict(self.train),
                "augment": self.augment.to_dict(), "dann": asdict(self.dann), "protocol": asdict(self.protocol),
                "merge": asdict(self.merge), "stain_norm": self.stain_norm, "source_map": self.source_map}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, base_dir: Path | None = None) -> ClassifierConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        check_known(data, known, "classifier config sections")
        source_map = data.get("source_map")
        if source_map and base_dir is not None and not Path(source_map).is_absolute():
            candidate = base_dir / source_map
            source_map = str(candidate) if candidate.exists() else source_map

        def section(kind: type, key: str) -> Any:
            return dataclass_from_dict(kind, data.get(key), f"classifier config keys in '{key}'")

        return cls(crop=CropConfig.from_dict(data.get("crop")), net=NetConfig.from_dict(data.get("net")),
                   train=section(OptimConfig, "train"),
                   augment=AugmentConfig.from_dict(data.get("augment")),
                   dann=section(DannConfig, "dann"),
                   protocol=section(ProtocolConfig, "protocol"),
                   merge=section(MergeConfig, "merge"),
                   stain_norm=str(data.get("stain_norm", "none")), source_map=source_map)


def load_classifier_config(path: str | Path | None) -> ClassifierConfig:
    """Read a classifier YAML config (every key optional); None reads the packaged default."""
    if path is None:
        text = resources.files("trainer").joinpath(f"configs/{DEFAULT_CONFIG}").read_text()
        return ClassifierConfig.from_dict(yaml.safe_load(text) or {})
    path = Path(path)
    return ClassifierConfig.from_dict(read_yaml_mapping(path, "classifier config"), base_dir=path.parent)


# --- data preparation ----------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Crops ready for the network: stain-normalised, masked if configured; labels as class indices."""

    x: torch.Tensor      # (N, S, S, 3) uint8
    y: torch.Tensor      # (N,) int64, -1 = unlabelled / class not in the model


def prepare(crops: CropSet, normalizer: StainNormalizer, crop_cfg: CropConfig, classes: list[str] | None = None
            ) -> Prepared:
    images = normalizer(crops.images, crops.stats)
    if crop_cfg.masked:
        images = apply_mask(images, crops.masks, crops.has_mask, crop_cfg.mask_grow)
    index = {c: i for i, c in enumerate(classes or [])}
    y = torch.tensor([index.get(lbl, -1) for lbl in crops.labels], dtype=torch.long)
    return Prepared(x=torch.from_numpy(np.ascontiguousarray(images)), y=y)


def order_classes(names: set[str] | list[str]) -> list[str]:
    """RV-PBS order first, anything else alphabetically after it."""
    names = set(names)
    return [c for c in RVPBS_LABELS if c in names] + sorted(names - set(RVPBS_LABELS))


# --- training ------------------------------------------------------------------------------------------

@dataclass
class EpochLog:
    epoch: int
    class_loss: float
    train_accuracy: float
    domain_loss: float | None = None
    domain_accuracy: float | None = None
    reversal_weight: float | None = None
    discriminator_grad: float | None = None   # L2 norm of the discriminator's gradient (mean per step)
    feature_grad: float | None = None         # L2 norm of the reversed gradient reaching the features
    domain_logit_std: float | None = None


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


def _balanced_batch(by_class: list[torch.Tensor], n: int, gen: torch.Generator) -> torch.Tensor:
    cls = torch.randint(len(by_class), (n,), generator=gen)
    out = torch.empty(n, dtype=torch.long)
    for c, pool in enumerate(by_class):
        sel = cls == c
        k = int(sel.sum())
        if k:
            out[sel] = pool[torch.randint(len(pool), (k,), generator=gen)]
    return out


def fit(model: CellNet, labelled: Prepared, steps: int, lr: float, cfg: ClassifierConfig, gen: torch.Generator,
        unlabelled: Prepared | None = None, desc: str = "train") -> list[EpochLog]:
    """Train ``model`` in place for ``steps`` class-balanced batches (plus a DANN domain loss when
    ``unlabelled`` is given). Returns one :class:`EpochLog` per ``train.epoch_steps`` steps."""
    opt_cfg = cfg.train
    keep = labelled.y >= 0
    labels = labelled.y[keep]
    index = torch.nonzero(keep).flatten()
    present = sorted(set(labels.tolist()))
    if not present:
        raise DatasetError(f"{desc}: no labelled crops to train on")
    by_class = [index[labels == c] for c in present]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=opt_cfg.weight_decay)
    disc_params = list(model.domain_head.parameters())
    history: list[EpochLog] = []
    acc: dict[str, list[float]] = {}
    dann = unlabelled is not None
    dev = _device_of(model)
    model.train()
    bs = opt_cfg.batch_size
    target_pools: list[torch.Tensor] | None = None
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=5):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        if dann and cfg.dann.balance_target and step % opt_cfg.epoch_steps == 0 and step > 0:
            target_pools = _pseudo_label_pools(model, unlabelled.x)
        idx = _balanced_batch(by_class, bs, gen)
        xb = augment_batch(to_unit(labelled.x[idx]), cfg.augment, gen).to(dev)
        yb = labelled.y[idx].to(dev)
        if dann:
            if target_pools:
                tidx = _balanced_batch(target_pools, bs, gen)
            else:
                tidx = torch.randint(len(unlabelled.x), (bs,), generator=gen)
            xt = augment_batch(to_unit(unlabelled.x[tidx]), cfg.augment, gen).to(dev)
            feats = model.features(standardise(torch.cat([xb, xt])))
            feats.retain_grad()
            logits = model.head(feats[:bs])
            progress = step / max(1, steps - 1)
            lam = cfg.dann.weight * (2.0 / (1.0 + math.exp(-cfg.dann.gamma * progress)) - 1.0)
            dlogit = model.domain_head(grad_reverse(feats, lam)).squeeze(1)
            dtrue = torch.cat([torch.zeros(bs), torch.ones(bs)]).to(dev)
            closs = F.cross_entropy(logits, yb, label_smoothing=opt_cfg.label_smoothing)
            dloss = F.binary_cross_entropy_with_logits(dlogit, dtrue)
            loss = closs + dloss
        else:
            logits = model(standardise(xb))
            closs = F.cross_entropy(logits, yb, label_smoothing=opt_cfg.label_smoothing)
            loss = closs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dann:
            dgrad = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in disc_params if p.grad is not None))
            acc.setdefault("dloss", []).append(float(dloss.detach()))
            acc.setdefault("dacc", []).append(float(((dlogit > 0).float() == dtrue).float().mean()))
            acc.setdefault("dgrad", []).append(dgrad)
            acc.setdefault("fgrad", []).append(float(feats.grad.norm()) if feats.grad is not None else 0.0)
            acc.setdefault("dstd", []).append(float(dlogit.detach().std()))
            acc.setdefault("lam", []).append(lam)
        opt.step()
        acc.setdefault("closs", []).append(float(closs.detach()))
        acc.setdefault("cacc", []).append(float((logits.argmax(1) == yb).float().mean()))
        if (step + 1) % opt_cfg.epoch_steps == 0 or step == steps - 1:
            entry = EpochLog(epoch=len(history) + 1, class_loss=float(np.mean(acc["closs"])),
                             train_accuracy=float(np.mean(acc["cacc"])))
            if dann:
                entry.domain_loss = float(np.mean(acc["dloss"]))
                entry.domain_accuracy = float(np.mean(acc["dacc"]))
                entry.reversal_weight = float(acc["lam"][-1])
                entry.discriminator_grad = float(np.mean(acc["dgrad"]))
                entry.feature_grad = float(np.mean(acc["fgrad"]))
                entry.domain_logit_std = float(np.mean(acc["dstd"]))
                log.info("%s epoch %d: class loss %.3f (train acc %.2f), domain loss %.3f, discriminator "
                         "accuracy %.3f, reversal weight %.2f, discriminator grad %.2e", desc, entry.epoch,
                         entry.class_loss, entry.train_accuracy, entry.domain_loss, entry.domain_accuracy,
                         entry.reversal_weight, entry.discriminator_grad)
            else:
                log.debug("%s epoch %d: class loss %.3f (train acc %.2f)", desc, entry.epoch, entry.class_loss,
                          entry.train_accuracy)
            history.append(entry)
            acc = {}
    model.eval()
    return history


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _pseudo_label_pools(model: CellNet, x: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    """Unlabelled crops grouped by the model's current prediction (used to balance DANN's target batches)."""
    model.eval()
    dev = _device_of(model)
    pred = torch.cat([model(standardise(to_unit(x[i:i + batch]).to(dev))).argmax(1).cpu()
                      for i in range(0, len(x), batch)])
    model.train()
    return [torch.nonzero(pred == c).flatten() for c in sorted(set(pred.tolist()))]


def dann_health(history: list[EpochLog]) -> dict[str, Any]:
    """Detect the two ways adversarial adaptation collapses, from the per-epoch discriminator log.

    - ``separable``: the discriminator's accuracy stays >= 0.98 over the last third of training although
      the reversal weight is up: the features were never aligned (the generator lost; adaptation did
      nothing).
    - ``stuck-at-chance``: accuracy within 0.5 +- 0.03 over the last third *and* a vanishing signal: the
      discriminator's gradient fell below 2% of its first-epoch value or its outputs are constant (logit
      spread < 1e-3). A healthy run also ends near chance, but with a discriminator that is still trying
      (non-vanishing gradient); a dead one gives the features no alignment signal at all (the paper's run).
    - ``ok`` otherwise.
    """
    rows = [h for h in history if h.domain_accuracy is not None]
    if len(rows) < 2:
        return {"status": "ok", "message": "too few epochs to judge", "final_domain_accuracy": None}
    tail = rows[-max(2, len(rows) // 3):]
    accs = [h.domain_accuracy for h in tail]
    first_grad = max(rows[0].discriminator_grad or 0.0, 1e-12)
    tail_grad = float(np.mean([h.discriminator_grad or 0.0 for h in tail]))
    tail_std = float(np.mean([h.domain_logit_std or 0.0 for h in tail]))
    out = {"final_domain_accuracy": round(rows[-1].domain_accuracy, 4),
           "tail_domain_accuracy": round(float(np.mean(accs)), 4),
           "tail_discriminator_grad_ratio": round(tail_grad / first_grad, 5), "tail_domain_logit_std": tail_std}
    if min(accs) >= 0.98:
        out.update(status="separable", message=(
            f"DANN collapsed: the domain discriminator separates source from target perfectly (accuracy "
            f"{np.mean(accs):.3f} over the last {len(tail)} epochs); the features were not aligned. Try stain "
            "normalisation, a larger dann.weight or more source_steps"))
    elif max(abs(a - 0.5) for a in accs) <= 0.03 and (tail_grad < 0.02 * first_grad or tail_std < 1e-3):
        out.update(status="stuck-at-chance", message=(
            f"DANN collapsed: the domain discriminator is stuck at chance ({np.mean(accs):.3f}) with a vanishing "
            f"gradient ({tail_grad / first_grad:.1e} of its first epoch's, logit spread {tail_std:.1e}); it gives "
            "the features no alignment signal. Lower dann.weight or dann.gamma, or the learning rate"))
    else:
        out.update(status="ok", message=(f"discriminator accuracy {rows[0].domain_accuracy:.3f} -> "
                                         f"{rows[-1].domain_accuracy:.3f}, gradient alive "
                                         f"({tail_grad / first_grad:.2f} of its first epoch's)"))
    return out


@torch.no_grad()
def adabn(model: CellNet, x: torch.Tensor, batch: int = 128) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` (uint8 crops, no augmentation)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    dev = _device_of(model)
    for i in range(0, len(x), batch):
        model.features(standardise(to_unit(x[perm[i:i + batch]]).to(dev)))
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


@torch.inference_mode()
# --- the target protocol -------------------------------------------------------------------------------

def split_target(target: CropSet, cfg: ProtocolConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(pool, evaluation)`` crop indices of the labelled target crops, split by frame (see module doc)."""
    labelled = np.array([bool(lbl) for lbl in target.labels])
    split = target.meta.get("split") or {}
    groups = sorted(set(target.groups))
    rng = np.random.default_rng(cfg.seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    candidates = [g for g in order if not (cfg.pool_split and split) or split.get(g) == cfg.pool_split]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(target.groups):
        members.setdefault(g, []).append(i)
    cand_counts: dict[str, int] = {}
    for g in candidates:
        for i in members[g]:
            if labelled[i]:
                cand_counts[target.labels[i]] = cand_counts.get(target.labels[i], 0) + 1
    cap = cfg.pool_per_class
    caps = {c: min(cap if cap is not None else n, math.floor(cfg.pool_fraction * n + 0.5))
            for c, n in cand_counts.items()}
    taken: dict[str, int] = {c: 0 for c in caps}
    pool_groups: set[str] = set()
    # first frames that fit under every cap, then (multi-cell frames) ones that fill a class still short
    for overshoot in (False, True):
        for g in candidates:
            labels_here = [target.labels[i] for i in members[g] if labelled[i]]
            if g in pool_groups or not labels_here or not any(taken[c] < caps[c] for c in labels_here):
                continue
            need = Counter(labels_here)
            if not overshoot and any(taken[c] + n > caps[c] for c, n in need.items()):
                continue
            pool_groups.add(g)
            for c in labels_here:
                taken[c] += 1
    pool = np.array([i for i in range(len(target)) if labelled[i] and target.groups[i] in pool_groups], int)
    evaluation = np.array([i for i in range(len(target)) if labelled[i] and target.groups[i] not in pool_groups], int)
    return pool, evaluation


def draw_few_shot(labels: list[str], k: int, seed: int) -> np.ndarray:
    """K indices per class (all of a class that has fewer), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for c in sorted(set(labels)):
        idx = np.array([i for i, lbl in enumerate(labels) if lbl == c])
        out += rng.choice(idx, size=min(k, len(idx)), replace=False).tolist()
    return np.array(sorted(out), int)


# --- experiments ---------------------------------------------------------------------------------------

@dataclass
class TrainedClassifier:
    """A trained model with what inference needs to use it."""

    model: CellNet
    classes: list[str]
    normalizer: StainNormalizer
    config: ClassifierConfig
    method: str
    report: dict[str, Any] = field(default_factory=dict)


def classifier_config(trained: TrainedClassifier, metrics: dict[str, Any] | None = None,
                      provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``classifier.config`` section a bundle stores: everything inference needs, plus metrics."""
    cfg = trained.config
    return {"version": CLASSIFIER_CONFIG_VERSION, "classes": list(trained.classes), "method": trained.method,
            "crop": cfg.crop.to_dict(), "net": cfg.net.to_dict(), "stain": trained.normalizer.to_dict(),
            "merge": {"classifier_weight": cfg.merge.classifier_weight}, "tta": tta_views(cfg.train.tta),
            "metrics": metrics or {}, "provenance": provenance or {}}


def cell_classifier(trained: TrainedClassifier) -> CellClassifier:
    """The pipeline's classifier (:class:`wbc_core.classifier.infer.CellClassifier`) over a freshly trained one."""
    cfg = trained.config
    return CellClassifier(trained.model, trained.classes, cfg.crop, trained.normalizer, cfg.merge, cfg.train.tta)


def _check_classes(method: str, source: CropSet | None, target_labels: set[str], labelled_target: set[str]) -> None:
    if source is not None and method != "target-only":
        if len(source.classes) < 2:
            raise DatasetError(f"the source has one class only ({source.classes}); a classifier needs at least two: "
                               "add class folders or fix the class map")
        missing = sorted(target_labels - set(source.classes))
        if missing:
            if method in ("source-only", "dann") and not labelled_target:
                raise DatasetError(
                    f"target classes {missing} have no source crops, so {method} cannot learn them: map a source "
                    "class onto them (class map), leave them out of the target (label map), or use --method "
                    "finetune / target-only with --few-shot K so they are learned from target labels")
            if missing and not set(missing) <= labelled_target:
                raise DatasetError(f"target classes {sorted(set(missing) - labelled_target)} are neither in the source "
                                   "nor among the labelled target crops; they cannot be learned")
            log.info("classes %s have no source crops: learned from the labelled target crops only", missing)
    if method in ("target-only", "finetune") and len(labelled_target) < 2 and method == "target-only":
        raise DatasetError(f"the labelled target crops have one class only ({sorted(labelled_target)}); target-only "
                           "training needs at least two classes")


class Experiment:
    """Source and target crops in memory, the fixed target split, and every method on top of them.

    Prepared (normalised, masked) tensors are cached per stain method, and finetune's source pre-training
    per (stain method, seed), so a benchmark runs all its rows on one set of crops.
    """

    def __init__(self, source: CropSet | None, target: CropSet, cfg: ClassifierConfig) -> None:
        self.source, self.target, self.cfg = source, target, cfg
        target_classes = set(target.classes)
        if len(target_classes) < 2:
            raise DatasetError(f"the target's labelled crops have one class only ({sorted(target_classes)}); "
                               "macro-F1 and a classifier need at least two classes: add labelled cells of "
                               "other types")
        if source is not None and len(source.classes) < 2:
            raise DatasetError(f"the source has one class only ({source.classes}); a classifier needs at least two")
        self.pool, self.eval = split_target(target, cfg.protocol)
        if len(self.eval) == 0:
            raise DatasetError("no labelled target crops are left for evaluation; lower protocol.pool_fraction")
        self.pool_labels = [target.labels[i] for i in self.pool]
        self.eval_labels = [target.labels[i] for i in self.eval]
        self.all_classes = order_classes(target_classes | set(source.classes if source is not None else []))
        self._prepared: dict[tuple[str, str], Prepared] = {}
        self._normalizers: dict[str, StainNormalizer] = {}
        self._pretrained: dict[tuple[str, int], tuple[dict[str, torch.Tensor], float, list[str]]] = {}
        self._pretrain_count = 0
        counts = {c: self.eval_labels.count(c) for c in order_classes(set(self.eval_labels))}
        pool_counts = {c: self.pool_labels.count(c) for c in order_classes(set(self.pool_labels))}
        log.info("target split by frame: labelled pool %d crops %s, evaluation %d crops %s", len(self.pool),
                 pool_counts, len(self.eval), counts)

    def normalizer(self, stain: str) -> StainNormalizer:
        if stain not in self._normalizers:
            frames = {}
            for i, g in enumerate(self.target.groups):
                frames.setdefault(g, i)
            idx = np.array(sorted(frames.values()), int)
            self._normalizers[stain] = StainNormalizer.fit(stain, {k: v[idx] for k, v in self.target.stats.items()})
        return self._normalizers[stain]

    def prepared(self, domain: str, stain: str) -> Prepared:
        key = (domain, stain)
        if key not in self._prepared:
            crops = self.source if domain == "source" else self.target
            if crops is None:
                raise DatasetError("this method needs a source (--source)")
            self._prepared[key] = prepare(crops, self.normalizer(stain), self.cfg.crop, self.all_classes)
        return self._prepared[key]

    def _new_model(self, n_classes: int, seed: int) -> CellNet:
        torch.manual_seed(seed)
        device = self.cfg.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return CellNet(n_classes, self.cfg.net).to(device)

    def _subset(self, prep: Prepared, idx: np.ndarray) -> Prepared:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return Prepared(x=prep.x[t], y=prep.y[t])

    def _pretrain(self, stain: str, seed: int, classes: list[str]) -> tuple[dict[str, torch.Tensor], float]:
        key = (stain, seed)
        if key not in self._pretrained or self._pretrained[key][2] != classes:
            t0 = time.perf_counter()
            self._pretrain_count += 1
            model = self._new_model(len(classes), seed)
            gen = torch.Generator().manual_seed(seed)
            fit(model, self.prepared("source", stain), self.cfg.train.source_steps, self.cfg.train.lr, self.cfg, gen,
                desc=f"source pre-training ({stain}, seed {seed})")
            self._pretrained[key] = ({k: v.clone() for k, v in model.state_dict().items()},
                                     time.perf_counter() - t0, classes)
        state, seconds, _ = self._pretrained[key]
        return state, seconds

    def train(self, method: str, stain: str, labelled_idx: np.ndarray | None, seed: int) -> TrainedClassifier:
        """Train one model. ``labelled_idx``: target crop indices whose labels may be used (None = none)."""
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
        cfg = self.cfg
        labelled_idx = np.asarray(labelled_idx if labelled_idx is not None else [], dtype=int)
        labelled_classes = {self.target.labels[i] for i in labelled_idx}
        if method in ("target-only", "finetune") and not len(labelled_idx):
            raise DatasetError(f"--method {method} needs labelled target crops (the pool is empty)")
        _check_classes(method, self.source, set(self.target.classes), labelled_classes)
        classes = order_classes(labelled_classes) if method == "target-only" else self.all_classes
        report: dict[str, Any] = {"method": method, "stain_norm": stain, "seed": seed,
                                  "labelled_target": len(labelled_idx), "classes": classes}
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        tgt = self.prepared("target", stain)
        remap = torch.full((len(self.all_classes) + 1,), -1, dtype=torch.long)
        for i, c in enumerate(self.all_classes):
            if c in classes:
                remap[i] = classes.index(c)

        def relabel(p: Prepared) -> Prepared:
            return Prepared(x=p.x, y=torch.where(p.y >= 0, remap[p.y.clamp(min=0)], p.y))

        if method == "target-only":
            model = self._new_model(len(classes), seed)
            fit(model, relabel(self._subset(tgt, labelled_idx)), cfg.train.target_steps, cfg.train.lr, cfg, gen,
                desc=f"target-only ({stain})")
        elif method == "source-only":
            model = self._new_model(len(classes), seed)
            fit(model, self.prepared("source", stain), cfg.train.source_steps, cfg.train.lr, cfg, gen,
                desc=f"source-only ({stain})")
        elif method == "finetune":
            state, pre_seconds = self._pretrain(stain, cfg.train.seed, classes)
            model = self._new_model(len(classes), seed)
            model.load_state_dict(state)
            report["pretrain_seconds"] = round(pre_seconds, 1)
            fit(model, relabel(self._subset(tgt, labelled_idx)), cfg.train.finetune_steps, cfg.train.finetune_lr, cfg,
                gen, desc=f"finetune ({stain})")
        else:  # dann
            model = self._new_model(len(classes), seed)
            src = self.prepared("source", stain)
            if len(labelled_idx):
                lab = self._subset(tgt, labelled_idx)
                src = Prepared(x=torch.cat([src.x, lab.x]), y=torch.cat([src.y, lab.y]))
            unl_idx = np.arange(len(self.target)) if cfg.protocol.unlabelled == "all" else self.pool
            unlabelled = self._subset(tgt, unl_idx)
            history = fit(model, src, cfg.train.source_steps, cfg.train.lr, cfg, gen, unlabelled=unlabelled,
                          desc=f"dann ({stain})")
            health = dann_health(history)
            (log.warning if health["status"] != "ok" else log.info)("%s", health["message"])
            report["dann"] = {"health": health, "epochs": [asdict(h) for h in history]}
            if cfg.dann.adabn:
                adabn(model, unlabelled.x)
        report["train_seconds"] = round(time.perf_counter() - t0, 1)
        return TrainedClassifier(model=model, classes=classes, normalizer=self.normalizer(stain), config=cfg,
                                 method=method, report=report)

    def evaluate(self, trained: TrainedClassifier, stain: str, tta: bool | int | None = None) -> dict[str, Any]:
        """Metrics on the evaluation crops, averaging ``tta`` views (default: the config's)."""
        tgt = self.prepared("target", stain)
        views = self.cfg.train.tta if tta is None else tta
        probs = predict_proba(trained.model, tgt.x[torch.from_numpy(self.eval)], tta=views)
        pred = [trained.classes[i] for i in probs.argmax(1)]
        classes = order_classes(set(trained.classes) | set(self.eval_labels))
        headline = self.cfg.protocol.headline
        metrics = classification_metrics(self.eval_labels, pred, classes, headline=headline)
        top_share = max(pred.count(c) for c in set(pred)) / len(pred)
        metrics["top_prediction_share"] = round(top_share, 4)
        if top_share > 0.9 and len(set(self.eval_labels)) > 1:
            log.warning("%s: %.0f%% of the evaluation crops get the same class: the classifier has collapsed onto "
                        "one class on the target", trained.method, 100 * top_share)
        return metrics

    def run(self, method: str, stain: str, k: int | None, draws: int | None = None, keep_models: int = 1
            ) -> dict[str, Any]:
        """One benchmark row: ``k`` labelled target cells per class (0 = none, None = the whole pool) drawn
        ``draws`` times (rows without a draw use ``protocol.seeds`` training seeds instead)."""
        t0 = time.perf_counter()
        proto = self.cfg.protocol
        if k == 0 and method in ("target-only", "finetune"):
            raise ValueError(f"--method {method} needs labelled target cells: --few-shot K with K >= 1")
        if k not in (0, None) and method == "source-only":
            raise ValueError("--method source-only uses no target labels; leave out --few-shot")
        runs = []
        pretrains_before = self._pretrain_count
        n = (draws or proto.draws) if k not in (0, None) else proto.seeds
        models = []
        for d in range(n):
            if k == 0:
                idx = np.zeros(0, int)
            elif k is None:
                idx = self.pool
            else:
                idx = self.pool[draw_few_shot(self.pool_labels, k, seed=proto.seed + d)]
            trained = self.train(method, stain, idx, seed=self.cfg.train.seed + d)
            metrics = self.evaluate(trained, stain)
            runs.append({"draw": d, "labelled": len(idx), "metrics": metrics, "report": trained.report})
            if len(models) < keep_models:
                models.append(trained)
            log.info("%s %s k=%s draw %d/%d: accuracy %.3f, macro-F1 %.3f%s", method, stain, k, d + 1, n,
                     metrics["accuracy"], metrics["macro_f1"],
                     f", headline F1 {metrics['macro_f1_headline']:.3f}" if "macro_f1_headline" in metrics else "")
        seconds = time.perf_counter() - t0
        if method == "finetune" and self._pretrain_count == pretrains_before:
            # the source pre-training was done for an earlier row and reused: count it, so that every row
            # reports what it costs on its own
            seconds += max(r["report"].get("pretrain_seconds", 0.0) for r in runs)
        return {"method": method, "stain_norm": stain, "k": k, "runs": runs, "models": models,
                "seconds": round(seconds, 1)}


def summarise_row(row: dict[str, Any], headline: bool = True) -> dict[str, Any]:
    """Mean/spread of a row's runs."""
    metrics = [r["metrics"] for r in row["runs"]]
    out = {"accuracy": summarise_draws([m["accuracy"] for m in metrics]),
           "macro_f1": summarise_draws([m["macro_f1"] for m in metrics])}
    if headline and "macro_f1_headline" in metrics[0]:
        out["macro_f1_headline"] = summarise_draws([m["macro_f1_headline"] for m in metrics])
    return out
