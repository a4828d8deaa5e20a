"""The serving core: image decoding, instance and mask types and conversions, the model bundle, model
construction, the one ``detect`` pipeline (:mod:`wbc_core.detect`), the crop classifier's inference and the
CVAT contract and encoding. ``serverless/`` and ``cvat_sync/`` build on it; ``trainer/`` sits above; nothing
here imports any of them (tests/test_layers.py keeps it so)."""
