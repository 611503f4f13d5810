"""Data: the Cityscapes layout, generated scenes, WebDataset shards and transforms."""
