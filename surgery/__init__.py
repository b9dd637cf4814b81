"""Model surgery for pretrained Keras networks: exact BatchNormalization insertion."""

from surgery.errors import SurgeryError
from surgery.insert import insert_identity_bn
from surgery.moments import Moments
from surgery.split import combine, split
from surgery.stats import activation_stats
from surgery.verify import Report, verify

__all__ = [
    "Moments",
    "Report",
    "SurgeryError",
    "activation_stats",
    "combine",
    "insert_identity_bn",
    "split",
    "verify",
]
