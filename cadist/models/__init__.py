"""Dense building blocks (method.md §2): the dilated ResNet and the DeepLabv3 head. Imports torch
only; naming, building, folding, loading and counting networks live one floor up in `nets`."""
