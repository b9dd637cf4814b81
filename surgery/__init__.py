"""Model surgery for pretrained Keras networks: exact BatchNormalization insertion."""

from surgery.cache import cache_features, open_features
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
    "cache_features",
    "combine",
    "insert_identity_bn",
    "open_features",
    "split",
    "verify",
]
