"""The WBC-type classifier: cell crops, source datasets, stain normalisation, domain adaptation, evaluation.

The segmenter finds and outlines each cell; this stage classifies a small square crop of every cell and is
trained on a large public source domain (PBC-style class folders) adapted to the lab's own slides (the
target). The same crop function (:mod:`trainer.classifier.crops`) makes the training crops and the crops
the pipeline classifies (:class:`trainer.predict.Predictor`).
"""

METHODS = ("source-only", "target-only", "finetune", "dann")
STAIN_METHODS = ("none", "reinhard", "macenko")
