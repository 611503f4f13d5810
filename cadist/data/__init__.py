"""Data: the Cityscapes layout, generated scenes, image files, WebDataset shards and manifests,
streaming and transforms. Imports errors and storage only."""
