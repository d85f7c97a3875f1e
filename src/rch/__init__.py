"""rch: the Representation Calibration Head (AAAI 2022, "Renovate Yourself") for PyTorch.

``import rch`` loads only torch; model zoos and plotting live in optional sub-packages.
"""

from __future__ import annotations

from . import functional
from .errors import RCHError
from .functional import RCHLossOutput, rch_loss
from .head import RCHHead, RCHHeadOutput
from .hooks import RCHAttachment, attach, export

__version__ = "0.1.0"

__all__ = [
    "RCHAttachment",
    "RCHError",
    "RCHHead",
    "RCHHeadOutput",
    "RCHLossOutput",
    "__version__",
    "attach",
    "export",
    "functional",
    "rch_loss",
]
