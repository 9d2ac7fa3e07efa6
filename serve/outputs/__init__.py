"""What a segmentation run writes: multilabel NIfTI with a label table, per-structure NIfTIs, statistics, preview."""
