"""fastpfc: fused PartialFC margin-softmax loss (ArcFace/CosFace) for millions of classes."""

from . import optim
from .functional import margin_softmax, partial_fc_loss
from .loss import PartialFCLoss
from .margins import MARGINS, ArcFace, CombinedMargin, CosFace, Margin, Softmax, create_margin
from .reference import reference_partial_fc_loss
from .sampling import sample_centers

__version__ = "0.1.0"

__all__ = [
    "MARGINS",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "Margin",
    "PartialFCLoss",
    "Softmax",
    "create_margin",
    "margin_softmax",
    "optim",
    "partial_fc_loss",
    "reference_partial_fc_loss",
    "sample_centers",
]
