"""Cases 7 and 8: what `convert` costs, and decoding an image folder.

7. `convert` (two passes) against a bare forward pass of the original, in
   process and as the CLI's marginal cost per sample.
8. The statistics pass over a folder of JPEGs resized to 224x224: with a
   cheap model against decoding alone on every core, and with VGG16 against
   the same images already decoded in memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

import surgery
from benchmarks.common import free_memory, images, interleaved, ratio_row
from surgery import default
from surgery.data import sources
from surgery.data.prefetch import available_cores, default_workers

BATCH = 32


def bare_forward(model, x):
    """The original model's compiled forward pass over the batches, nothing else."""

    def run():
        for i in range(0, len(x), BATCH):
            model.predict_on_batch(x[i : i + BATCH])

    return run


# -- case 7 -------------------------------------------------------------------


def convert(samples: int, repeats: int, log=print) -> list[dict]:
    """convert vs the bare forward pass; the three-pass recipe beside it."""
    model = default.load()
    x = images(samples, 32)
    taps = ["fc1", "fc2"]

    def two_passes():
        return surgery.convert(model, taps, data=x, batch_size=BATCH, verbose=0)

    def three_passes():
        stats = surgery.activation_stats(model, taps, x, batch_size=BATCH, verbose=0)
        new = surgery.insert_identity_bn(model, taps, stats=stats)
        return surgery.verify(model, new, x, batch_size=BATCH, verbose=0)

    times = interleaved(
        {
            "convert": two_passes,
            "stats + insert + verify": three_passes,
            "bare forward": bare_forward(model, x),
        },
        repeats,
    )
    name = f"embedded digits model, {samples} samples (fc1, fc2)"
    rows = [
        ratio_row(
            "convert",
            f"convert vs bare forward: {name}",
            times,
            "convert",
            "bare forward",
            2.2,
            samples=samples,
        ),
        ratio_row(
            "convert",
            f"three passes vs bare forward: {name}",
            times,
            "stats + insert + verify",
            "bare forward",
            None,
            samples=samples,
        ),
    ]
    for r in rows:
        log(f"  {r['name']}: {r['ratio']:.3f}x")
    rows.append(_cli_marginal(samples, max(3, repeats - 2), log))
    return rows


_BARE_CLI = """
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras
from surgery import default
model = default.load()
x = np.load(sys.argv[1], mmap_mode="r")[: int(sys.argv[2])]
for i in range(0, len(x), 32):
    model.predict_on_batch(np.asarray(x[i : i + 32]))
"""


def _cli_marginal(samples: int, repeats: int, log) -> dict:
    """Seconds per extra sample of `surgery convert` vs of a bare forward script.

    Each is run as a fresh process over the first `small` and over all
    `samples` rows of one .npy; the difference cancels start-up, imports,
    loading and tracing.
    """
    small = samples // 5
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "x.npy")
        np.save(data, images(samples, 32, seed=1))
        out = os.path.join(tmp, "bn.keras")

        def cli(n):
            cmd = [
                sys.executable,
                "-m",
                "surgery",
                "--format",
                "json",
                "convert",
                "--data",
                data,
                "--max-samples",
                str(n),
                "--out",
                out,
                "--force",
            ]
            return lambda: subprocess.run(cmd, env=env, check=True, capture_output=True)

        def bare(n):
            cmd = [sys.executable, "-c", _BARE_CLI, data, str(n)]
            return lambda: subprocess.run(cmd, env=env, check=True, capture_output=True)

        runs = {
            "convert small": cli(small),
            "convert all": cli(samples),
            "bare small": bare(small),
            "bare all": bare(samples),
        }
        times = interleaved(runs, repeats)
    extra = samples - small
    per_sample = {
        "convert": [
            (b - a) / extra
            for a, b in zip(times["convert small"], times["convert all"], strict=True)
        ],
        "bare forward": [
            (b - a) / extra
            for a, b in zip(times["bare small"], times["bare all"], strict=True)
        ],
    }
    row = ratio_row(
        "convert",
        f"CLI `surgery convert` vs bare forward script, marginal s/sample "
        f"({small} → {samples} samples, fresh processes)",
        per_sample,
        "convert",
        "bare forward",
        1.5,
        samples=samples,
        process_seconds={k: float(np.median(v)) for k, v in times.items()},
    )
    if min(min(v) for v in per_sample.values()) <= 0:
        # the extra samples cost less than the noise in start-up: no figure
        row.update(met=None, note="not measurable: a marginal came out <= 0")
    log(f"  {row['name']}: {row['ratio']:.3f}x")
    return row


# -- case 8 -------------------------------------------------------------------


def jpeg_folder(folder: str, count: int, size=(375, 400)) -> str:
    """`count` JPEGs of `size` (h, w), crops of scikit-learn's sample photos.

    Without scikit-learn, smooth synthetic pictures stand in for them.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
    except ImportError:
        base = rng.uniform(0, 255, (2, 48, 64, 3)).astype("uint8")
        photos = [np.asarray(Image.fromarray(b).resize((640, 480))) for b in base]
    h, w = size
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - h + 1)
        x = rng.integers(0, photo.shape[1] - w + 1)
        crop = photo[y : y + h, x : x + w]
        if i % 4 >= 2:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(
            os.path.join(folder, f"{i:05d}.jpg"), quality=90
        )
    return folder


def cheap_model() -> keras.Model:
    """Nearly free per image, so that decoding is the bound."""
    return keras.Sequential(
        [
            keras.Input((224, 224, 3)),
            keras.layers.AveragePooling2D(8, name="pool"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
        ],
        name="cheap",
    )


def plain_decode(path, size=(224, 224)) -> np.ndarray:
    """What a plain loader does: decode, resize bilinearly, uint8 pixels."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))


def decode(counts: dict, repeats: int, vgg_repeats: int, log=print) -> list[dict]:
    """The statistics pass over JPEGs vs decoding alone / pre-decoded data.

    The cheap model's passes take about a second, so they get `repeats`;
    VGG16's take half a minute each, so they get `vgg_repeats`.
    """
    cores = available_cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = jpeg_folder(os.path.join(tmp, "jpegs"), counts["cheap"])
        cheap = cheap_model()

        def folder_stats(model, layers, workers, n=None):
            data = sources.open_source(folder, model=model, workers=workers)
            return lambda: surgery.activation_stats(
                model, layers, data, max_samples=n, verbose=0
            )

        files = sources.list_images(folder)

        def decode_only(threads):
            def run():
                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(plain_decode, files):
                        pass

            return run

        times = interleaved(
            {
                "stats pass": folder_stats(cheap, ["pool"], None),
                "stats pass, workers = cores": folder_stats(cheap, ["pool"], cores),
                "stats pass, 1 worker": folder_stats(cheap, ["pool"], 1),
                "decode only": decode_only(cores),
                "decode only, default-workers threads": decode_only(default_workers()),
            },
            repeats,
        )
        n = counts["cheap"]
        what = f"{n} JPEGs 400x375 → 224x224, {cores} cores"
        rows.append(
            ratio_row(
                "decode",
                f"cheap model: statistics pass (default workers, {default_workers()} threads) "
                f"vs plain PIL decode+resize on a pool of {cores} threads, time ratio "
                f"({what}; rate >= 0.9x means <= 1.111x)",
                times,
                "stats pass",
                "decode only",
                round(1 / 0.9, 3),
                samples=n,
                rate_ratio=_rate(times, "stats pass", "decode only"),
            )
        )
        for name, a, b in [
            (
                f"statistics pass with workers={cores} vs the same plain decode",
                "stats pass, workers = cores",
                "decode only",
            ),
            (
                "statistics pass with 1 worker (serial decode) vs the same plain decode",
                "stats pass, 1 worker",
                "decode only",
            ),
            (
                f"statistics pass (default workers) vs plain decode on {default_workers()} threads",
                "stats pass",
                "decode only, default-workers threads",
            ),
        ]:
            rows.append(
                ratio_row(
                    "decode",
                    f"cheap model: {name} ({what})",
                    times,
                    a,
                    b,
                    None,
                    samples=n,
                )
            )
        for r in rows:
            log(f"  {r['name']}: {r['ratio']:.3f}x")

        n = counts["vgg16"]
        vgg = keras.applications.VGG16(weights=None)
        layers = ["fc1", "fc2"]
        decoded = np.stack([plain_decode(f) for f in files[:n]])

        def in_memory():
            return surgery.activation_stats(vgg, layers, decoded, verbose=0)

        times = interleaved(
            {"from JPEGs": folder_stats(vgg, layers, None, n), "in memory": in_memory},
            vgg_repeats,
        )
        rows.append(
            ratio_row(
                "decode",
                f"VGG16 (weights=None, fc1+fc2): statistics pass over the JPEGs vs over "
                f"the same images decoded in memory, time ratio ({n} JPEGs, {cores} "
                "cores; rate >= 0.95x means <= 1.053x)",
                times,
                "from JPEGs",
                "in memory",
                round(1 / 0.95, 3),
                samples=n,
                rate_ratio=_rate(times, "from JPEGs", "in memory"),
            )
        )
        log(f"  {rows[-1]['name']}: {rows[-1]['ratio']:.3f}x")
    free_memory()
    return rows


def _rate(times, a, b) -> float:
    """Median of per-repeat rate ratios (a's images/s over b's)."""
    return float(np.median([y / x for x, y in zip(times[a], times[b], strict=True)]))
