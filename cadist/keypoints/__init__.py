"""Keypoint descriptors with adaptive downsampling (method.md §11): D2-Net at dense output strides
and the adaptive APD2Net, SIFT keypoints, descriptor sampling. Imports adaptive and nets."""
