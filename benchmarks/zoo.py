"""Case 6: identity BN after every Conv/Dense of every keras.applications model.

Each architecture is built offline (weights=None) at the smallest input it
accepts, fed uniform 0..255 images through its own `preprocess_input` (the
identity for models with built-in preprocessing), and rebuilt with a BN after
every Conv/Dense layer from statistics computed beforehand. Reported per
model: taps, units, units made exact, bit-identity of the outputs, the
largest ulp difference and the rebuild seconds (no data pass).
"""

from __future__ import annotations

import importlib
import re
import time
import warnings

import keras

import surgery
from benchmarks.common import conv_dense_taps, free_memory, images
from surgery.graph.spots import find_spots
from surgery.testing.synthetic import pretrained_like

# The default run covers these (one or two per family, the quicker ones);
# --zoo-all covers every architecture (about 17 minutes on 2 cores).
DEFAULT = (
    "VGG16",
    "VGG19",
    "ResNet50",
    "ResNet101",
    "ResNet50V2",
    "InceptionV3",
    "Xception",
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "MobileNetV3Large",
    "DenseNet121",
    "DenseNet169",
    "NASNetMobile",
    "EfficientNetB0",
    "EfficientNetB1",
    "EfficientNetV2B0",
    "EfficientNetV2B1",
    "ConvNeXtTiny",
)
# Off TensorFlow the default run covers the four models the tests cover.
OTHER_BACKENDS = ("VGG16", "ResNet50", "MobileNetV2", "EfficientNetB0")
SIZES = (32, 71, 75)  # smallest first; Xception needs 71, Inception* 75
INEXACT = re.compile(r"(\d+) unit\(s\) have no exact identity pair")


def architectures() -> list[str]:
    return sorted(n for n in dir(keras.applications) if n[:1].isupper())


def build(name: str):
    """The model at the smallest input size it accepts, and that size."""
    fn = getattr(keras.applications, name)
    last = None
    for size in SIZES:
        try:
            return fn(weights=None, input_shape=(size, size, 3)), size
        except ValueError as e:
            last = e
    raise last


def preprocess(name: str, x):
    fn = getattr(keras.applications, name)
    module = importlib.import_module(fn.__module__)
    return module.preprocess_input(x.copy())


def one(name: str, samples: int, zero_mean: bool = False) -> dict:
    start = time.perf_counter()
    model, size = build(name)
    built = time.perf_counter() - start
    x = preprocess(name, images(samples, size, seed=1))
    taps, refused = [], []
    for tap in conv_dense_taps(model):
        try:
            find_spots(model, after=[tap])
            taps.append(tap)
        except surgery.SurgeryError as e:
            refused.append(f"{tap}: {e}")
    start = time.perf_counter()
    stats = surgery.activation_stats(model, taps, x, verbose=0)
    stats_s = time.perf_counter() - start
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        new = surgery.insert_identity_bn(
            model, after=taps, stats=stats, zero_mean=zero_mean
        )
        rebuild_s = time.perf_counter() - start
    inexact = sum(
        int(m.group(1)) for w in caught if (m := INEXACT.search(str(w.message)))
    )
    report = surgery.verify(model, new, x, verbose=0)
    units = sum(stats[t].units for t in taps)
    compiled = {"none": _modes(model, taps, stats, x)}
    pretrained_like(model, seed=2)
    stats = surgery.activation_stats(model, taps, x, verbose=0)
    compiled["pretrained-like"] = _modes(model, taps, stats, x)
    return {
        "model": name,
        "zero_mean": zero_mean,
        "input": size,
        "params": model.count_params(),
        "taps": len(taps),
        "refused": refused,
        "units": units,
        "exact_units": units - inexact,
        "identical": report.identical,
        "max_ulp_diff": report.max_ulp_diff,
        "samples": report.samples,
        "build_s": built,
        "stats_s": stats_s,
        "rebuild_s": rebuild_s,
        "compiled": compiled,
    }


def _modes(model, taps, stats, x) -> dict:
    """Insert with the compiled check on, then compare in graph and XLA mode.

    Also counts the BNs that got float64 (see `surgery.graph.fusion`) and whether
    insert warned that the compiled model differs.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = surgery.insert_identity_bn(model, after=taps, stats=stats, data=x)
    warned = any("not bit-identical" in str(w.message) for w in caught)
    bns = [la for la in new._flatten_layers() if la.name.endswith("_bn")]
    out = {
        "float64_bns": sum(la.dtype_policy.name == "float64" for la in bns),
        "bns": len(bns),
        "warned": warned,
    }
    for mode in ("graph", "xla"):
        try:
            r = surgery.verify(model, new, x, verbose=0, mode=mode)
            out[mode] = {
                "identical": r.identical,
                "max_ulp": r.max_ulp_diff,
                "noise_ulp": r.noise_ulp,
            }
        except Exception as e:  # XLA cannot compile some ops on CPU
            out[mode] = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
    return out


def run(samples: int, only: list[str] | None = None, log=print) -> dict:
    """Every model in `only` (default: all); on torch both the default and
    the `zero_mean` opt-in, since only the latter is an exact identity there."""
    rows, failures = [], []
    variants = [False, True] if keras.backend.backend() == "torch" else [False]
    for name, zero_mean in [(n, z) for n in only or architectures() for z in variants]:
        start = time.perf_counter()
        try:
            rows.append(one(name, samples, zero_mean))
            r = rows[-1]
            log(
                f"  {name}: {r['taps']} taps, identical {r['identical']}, "
                f"{time.perf_counter() - start:.0f} s"
            )
        except Exception as e:  # report and carry on with the next model
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failures.append({"model": name, "reason": f"{type(e).__name__}: {reason}"})
            log(f"  {name}: FAILED {failures[-1]['reason']}")
        free_memory()
    return {"samples": samples, "rows": rows, "failures": failures}


if __name__ == "__main__":
    import sys

    result = run(int(sys.argv[1]), sys.argv[2:] or None)
    print(result["failures"])
