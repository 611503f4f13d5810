"""Metrics: segmentation confusion matrix (method.md §9)."""
