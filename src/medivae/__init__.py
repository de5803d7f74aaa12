"""medivae: variational autoencoders for medical images.

Nothing heavy runs at import; the Python API lives in :mod:`medivae.api`.
"""

__version__ = "0.1.0"
