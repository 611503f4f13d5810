"""Evaluation: the evaluation pass, mIoU, test-time augmentation, prediction, HPatches, and the
`cadist eval` runs (in process, as Ray tasks, at varied settings). Imports up to cluster and tracking."""
