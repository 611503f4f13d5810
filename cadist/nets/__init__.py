"""Whole networks of any kind: building one by name, folding BatchNorm, weights files, MAC
counting and the high-res statistics behind it. Imports models, adaptive, config, data."""
