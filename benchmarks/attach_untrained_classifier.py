"""Attach the default-architecture crop classifier (untrained weights) to the latency bundle: the latency of the
classify stage depends on the architecture (crop 64, width 32, the default TTA views) and the cell count, not the
weights."""
import sys
from pathlib import Path

import torch

from trainer.classifier.train import ClassifierConfig, TrainedClassifier, classifier_config, load_classifier_config
from wbc_core.bundle import attach_classifier
from wbc_core.classifier.model import CellNet
from wbc_core.classifier.stain import StainNormalizer, frame_stats, stack_stats
from wbc_core.data.images import read_rgb

bundle, task = Path(sys.argv[1]), Path(sys.argv[2])
cfg: ClassifierConfig = load_classifier_config(None)
classes = ["band cell", "basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "promyelocyte",
           "myelocyte", "metamyelocyte"]  # what a PBC-source classifier names
torch.manual_seed(0)
net = CellNet(len(classes), cfg.net).eval()
frames = sorted((task / "images").glob("*.jpg"))[:8]
normalizer = StainNormalizer.fit("reinhard", stack_stats([frame_stats(read_rgb(f)[0]) for f in frames]))
trained = TrainedClassifier(model=net, classes=classes, normalizer=normalizer, config=cfg, method="source-only")
attach_classifier(bundle, net.state_dict(), classifier_config(trained, provenance={
    "note": "default architecture, untrained weights: for the latency benchmark only"}))
print("attached", bundle, "classes", len(classes), "tta", cfg.train.tta, "crop", cfg.crop.size, "width", cfg.net.width)
