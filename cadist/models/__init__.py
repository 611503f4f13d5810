"""Dense DeepLabv3 models (method.md §2). Imports torch only."""
