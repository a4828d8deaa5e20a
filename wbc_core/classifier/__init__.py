"""The crop classifier at inference: network, crops, stain normalisation, and the merge with the segmenter."""
