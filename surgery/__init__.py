"""Model surgery for pretrained Keras networks: exact BatchNormalization insertion.

The public names load on first use, so `import surgery` stays light and the
command line can configure TensorFlow's logging before Keras is imported.
The modules live in subpackages by concern (`graph`, `numerics`, `data`,
`engines`, `files`, `verbs`, `cli`, `runtime`, `testing`), so none at the top
level is named like a public function and shadows it (`surgery.verify` is the
function; its module is `surgery.verbs.verify`).
"""

import importlib

_PUBLIC = {
    "Moments": "surgery.numerics.moments",
    "RayEngine": "surgery.engines.ray_engine",
    "Report": "surgery.numerics.compare",
    "SurgeryError": "surgery.errors",
    "activation_stats": "surgery.verbs.stats",
    "cache_features": "surgery.verbs.cache",
    "channel_groups": "surgery.pruning.groups",
    "combine": "surgery.verbs.split",
    "convert": "surgery.verbs.convert",
    "deepen": "surgery.editing.layers",
    "delete_channels": "surgery.pruning.delete",
    "delete_layer": "surgery.editing.layers",
    "edit": "surgery.editing.layers",
    "fold_bn": "surgery.verbs.fold",
    "functional": "surgery.graph.tracing",
    "foldable": "surgery.verbs.fold",
    "insert_identity_bn": "surgery.verbs.insert",
    "insert_layer": "surgery.editing.layers",
    "open_features": "surgery.verbs.cache",
    "prune_channels": "surgery.pruning.prune",
    "recalibrate_bn": "surgery.verbs.recalibrate",
    "replace_layer": "surgery.editing.layers",
    "split": "surgery.verbs.split",
    "verify": "surgery.verbs.verify",
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
