"""Model surgery for pretrained Keras networks: exact BatchNormalization insertion.

The public names load on first use, so `import surgery` stays light and the
command line can configure TensorFlow's logging before Keras is imported.
No module is named like a public function: importing it would shadow the
function (`surgery.verify` is the function; its module is `verification`).
"""

import importlib

_PUBLIC = {
    "Moments": "surgery.moments",
    "RayEngine": "surgery.ray_engine",
    "Report": "surgery.verification",
    "SurgeryError": "surgery.errors",
    "activation_stats": "surgery.stats",
    "cache_features": "surgery.cache",
    "combine": "surgery.splitting",
    "convert": "surgery.conversion",
    "fold_bn": "surgery.fold",
    "functional": "surgery.tracing",
    "foldable": "surgery.fold",
    "insert_identity_bn": "surgery.insert",
    "open_features": "surgery.cache",
    "recalibrate_bn": "surgery.recalibrate",
    "split": "surgery.splitting",
    "verify": "surgery.verification",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
