"""The tuning platform: data, the one training loop, metrics, backbones, search and CLIs.

Only :mod:`tuner.trainable` and :mod:`tuner.search` import Ray Tune; everything else is plain
PyTorch / NumPy / PyArrow and unit-testable without a cluster.
"""

__version__ = "0.1.0"
