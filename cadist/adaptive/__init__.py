"""Content-adaptive downsampling (method.md §3–§6): mixed-resolution layouts, irregular
convolutions, adaptive ResNet stages and masks. Imports torch only."""
