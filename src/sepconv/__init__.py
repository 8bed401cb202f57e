"""sepconv: depthwise separable convolutions for PyTorch.

Blocks (DSC, BSConv-U/S), exact and certified spectral norms of every convolution
geometry, spectral normalization, and conversion of trained regular convolutions into
separable ones. See the README for a tour.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("sepconv")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from .errors import SepconvError  # noqa: E402

__all__ = ["SepconvError", "__version__"]
