"""Content-adaptive downsampling (method.md §3–§7): mixed-resolution layouts, irregular convolutions,
adaptive ResNet stages, edge and learned masks. Imports torch and `models` (the dense blocks) only."""
