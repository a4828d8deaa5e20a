"""The WBC-type classifier: cell crops, source datasets, stain normalisation, domain adaptation, evaluation.

The segmenter finds and outlines each cell; this stage classifies a small square crop of every cell and is
trained on a large public source domain (PBC-style class folders) adapted to the lab's own slides (the
target). The same crop function (:mod:`wbc_core.classifier.crops`) makes the training crops and the crops
the pipeline classifies (:class:`wbc_core.detect.Predictor`).
"""

METHODS = ("source-only", "target-only", "finetune", "dann")
from wbc_core.classifier.stain import METHODS as STAIN_METHODS  # noqa: E402

__all__ = ["METHODS", "STAIN_METHODS"]
