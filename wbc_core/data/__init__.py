"""Annotated datasets: instance types, mask conversions, image decoding, COCO and CVAT XML readers/writers."""
