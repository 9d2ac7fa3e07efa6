"""Preprocess once, run the sub-models, merge, and return to the input grid (no Ray, no S3)."""
