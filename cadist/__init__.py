"""cadist: content-adaptive downsampling for dense-prediction CNNs, trained at scale."""

__version__ = "0.1.0"
