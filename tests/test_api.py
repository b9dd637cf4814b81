import importlib
import pkgutil
import types

import surgery

PUBLIC = [
    "Moments", "RayEngine", "Report", "SurgeryError", "activation_stats",
    "cache_features", "channel_groups", "combine", "convert", "deepen",
    "delete_channels", "delete_layer", "edit",
    "fold_bn", "foldable", "functional", "insert_identity_bn", "insert_layer",
    "open_features", "prune_channels", "recalibrate_bn", "replace_layer",
    "split", "verify",
]  # fmt: skip


def test_public_names_survive_importing_every_module():
    for module in pkgutil.walk_packages(surgery.__path__, "surgery."):
        if module.name not in ("surgery.__main__", "surgery.default.train"):
            importlib.import_module(module.name)
    assert sorted(surgery.__all__) == PUBLIC
    for name in PUBLIC:
        value = getattr(surgery, name)
        assert not isinstance(value, types.ModuleType), name
        assert value.__name__ == name
