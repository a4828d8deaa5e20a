"""Training configuration: one YAML file, every key optional (the defaults train the CPU model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trainer.data.segmentation_dataset import AugmentConfig, ScaleConfig
from wbc_core.config_io import check_known, dataclass_from_dict, read_yaml_mapping
from wbc_core.labels import LabelMap
from wbc_core.model import SegmenterConfig


@dataclass
class OptimConfig:
    seed: int = 0
    epochs: int = 24
    # With few frames, raise the epochs until training runs at least this many steps (0: epochs alone decide).
    # A fine-tune on a lab's first 6 frames is otherwise over after 42 steps and leaves most of its budget unused.
    min_steps: int = 0
    # Train exactly this many steps (0: off): epochs and min_steps are then ignored, the learning-rate schedule
    # follows steps alone and max_minutes only caps the run, so the same data and seed give the same model on a
    # busy machine as on an idle one (the correction-effort benchmark compares orders of frames this way).
    max_steps: int = 0
    max_minutes: float | None = None   # stop early (and still write a bundle) after this much training
    batch_size: int = 2
    optimizer: str = "adamw"           # adamw | sgd
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    momentum: float = 0.9              # sgd only
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02         # cosine decays to lr * min_lr_ratio
    grad_clip: float = 10.0
    scale_jitter: list[float] = field(default_factory=lambda: [0.8, 1.0])  # input-size range, x min_size
    checkpoint_every: int = 100        # steps; also at an epoch end this many steps after the last (0: every epoch)
    num_workers: int = 1
    threads: int = 0                   # torch intra-op threads; 0 = all cores
    # After the last step, BatchNorm statistics are recomputed as the plain mean over this many training images,
    # augmented and batched as in training ("precise BN"; 0: keep the moving averages). With batches of 2 and
    # colour augmentation, the moving averages are mostly those of the last ~10 batches: a fine-tune on a lab's
    # first frames would end on statistics that change with every run.
    precise_bn_frames: int = 64
    device: str = "auto"               # auto (cuda if available) | cpu | cuda | cuda:N
    # Cells with these CVAT sources train finding cells but not outlines (no mask loss). The retrain sets
    # ["auto"]: a cell the expert left as the function drew it carries the serving model's outline, not theirs.
    mask_skip_sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {self.optimizer!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        for name in ("min_steps", "max_steps", "precise_bn_frames"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if not (isinstance(self.mask_skip_sources, list | tuple)
                and all(isinstance(x, str) and x for x in self.mask_skip_sources)):
            raise ValueError(f"mask_skip_sources must be a list of CVAT sources (e.g. [auto]), not "
                             f"{self.mask_skip_sources!r}")
        self.mask_skip_sources = list(self.mask_skip_sources)


@dataclass
class TrainConfig:
    model: SegmenterConfig = field(default_factory=SegmenterConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    labels: LabelMap = field(default_factory=LabelMap)
    score_threshold: float = 0.5       # default detection threshold stored in the bundle
    scale: ScaleConfig = field(default_factory=ScaleConfig)  # input sizing: fixed (default) or by red-cell size

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": asdict(self.train), "augment": self.augment.to_dict(),
                "labels": self.labels.to_dict(), "score_threshold": self.score_threshold,
                "scale": self.scale.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: Path | None = None) -> TrainConfig:
        data = dict(data or {})
        check_known(data, (f.name for f in fields(cls)), "config sections")
        labels = data.get("labels")
        if isinstance(labels, str):
            path = Path(labels)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            label_map = LabelMap.from_yaml(path)
        elif isinstance(labels, dict):
            label_map = LabelMap(classes=list(labels.get("classes") or LabelMap().classes),
                                 aliases=dict(labels.get("aliases") or {}),
                                 ignore=list(labels.get("ignore") or []))
        else:
            label_map = LabelMap()
        return cls(model=SegmenterConfig.from_dict(data.get("model") or {}),
                   train=dataclass_from_dict(OptimConfig, data.get("train"), "train keys"),
                   augment=AugmentConfig.from_dict(data.get("augment")),
                   labels=label_map,
                   score_threshold=float(data.get("score_threshold", 0.5)),
                   scale=ScaleConfig.from_dict(data.get("scale")))


def load_config(path: str | Path | None) -> TrainConfig:
    """Read a YAML config; ``None`` gives the packaged CPU default."""
    if path is None:
        text = resources.files("trainer").joinpath("configs/segmenter-cpu.yaml").read_text()
        return TrainConfig.from_dict(yaml.safe_load(text) or {})
    path = Path(path)
    return TrainConfig.from_dict(read_yaml_mapping(path, "config"), base_dir=path.parent)


#: Model config keys that only shape training: fine-tuning keeps the training config's values for these and
#: takes every other (architecture, input size) from the bundle it starts from.
TRAINING_ONLY_MODEL_KEYS = ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "box_batch_size_per_image",
                            "trainable_backbone_layers")


def finetune_from_bundle(cfg: TrainConfig, bundle_dir: str | Path, lr_scale: float = 0.3) -> TrainConfig:
    """``cfg`` set to fine-tune the segmenter of ``bundle_dir``: its weights, its architecture and input scale
    (the weights were trained at them), its served score threshold (chosen for it on validation frames; a retrain
    that reset it to the config's would change what the lab sees overnight), the training-only model keys of
    ``cfg``, and a gentler start (lr x
    ``lr_scale``, a short warm-up: a trained model's first steps must not undo it). Class heads are
    re-initialised when the class count differs (:func:`wbc_core.model.load_weights`)."""
    from wbc_core.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.model_config.backbone != cfg.model.backbone:
        raise ValueError(f"the bundle {bundle_dir} is a {bundle.model_config.backbone} model but the segmenter "
                         f"config asks for {cfg.model.backbone}; start from scratch or use a {cfg.model.backbone} "
                         "bundle")
    keep = {k: v for k, v in cfg.model.to_dict().items() if k in TRAINING_ONLY_MODEL_KEYS}
    cfg.model = SegmenterConfig.from_dict({**bundle.model_config.to_dict(), **keep,
                                           "weights": str(bundle.segmenter_path), "backbone_weights": None})
    if bundle.scale:
        cfg.scale = ScaleConfig.from_dict({k: v for k, v in bundle.scale.items()
                                           if k in ScaleConfig.__dataclass_fields__})
    cfg.score_threshold = float(bundle.score_threshold)
    cfg.train.lr *= lr_scale
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, 10)
    return cfg
