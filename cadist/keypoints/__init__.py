"""Keypoint descriptors with adaptive downsampling (method.md §11): D2-Net (VGG-16 to conv4_3) at
dense output strides and the adaptive APD2Net, SIFT keypoints, descriptor sampling."""
