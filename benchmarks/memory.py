"""Case 2: peak RSS of a statistics pass for growing N, each in a fresh process.

The data is a float32 .npy file of 25088-d features in a temporary directory.
Each (method, N) runs in its own subprocess. Peak RSS is the kernel's
high-water mark of the process's resident set (`VmHWM` in /proc/self/status,
the figure `getrusage` reports as `ru_maxrss`). After imports, model build
and a one-batch warm-up, the child resets it (`echo 5 > /proc/self/clear_refs`):
building the 25088x4096 layer's random weights peaks far above anything the
pass allocates and would hide it. `ru_maxrss` itself cannot be reset
reliably: each thread that exits folds the high-water mark of that moment
into it for good, and TensorFlow's threads come and go. The baseline is the
RSS at the reset (model weights included), the peak is `VmHWM` after the
pass; `ru_maxrss` is recorded too. Methods:

- `stats`: `activation_stats` over a `keras.utils.PyDataset` that reads each
  batch from the file with plain reads, so no data page is mapped into the
  process;
- `in-memory`: the usual recipe, `model.predict` of all tap activations over
  the same reader, then numpy float64 mean and variance;
- `stats-memmap`: `activation_stats` on `np.load(path, mmap_mode="r")[:N]`.
  Pages of a file mapping that have been read count in a process's RSS, so
  this column grows by the size of the data read even though no anonymous
  memory does; it is there to show that, not as the target.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

import surgery
from benchmarks.common import dense_head, features

METHODS = ("stats", "in-memory", "stats-memmap")
LAYERS = ["fc1", "fc2"]


class FileRows(keras.utils.PyDataset):
    """Rows [0, n) of a 2-d .npy file, read batch by batch without mmap."""

    def __init__(self, path, n: int, batch_size: int):
        super().__init__()
        header = np.load(path, mmap_mode="r")
        self._offset, self._width = header.offset, header.shape[1]
        del header
        self._file = open(path, "rb")  # noqa: SIM115  (lives as long as self)
        self._n, self._batch = n, batch_size

    def __len__(self):
        return math.ceil(self._n / self._batch)

    def __getitem__(self, i):
        lo = i * self._batch
        rows = min(self._n, lo + self._batch) - lo
        self._file.seek(self._offset + lo * self._width * 4)
        x = np.fromfile(self._file, dtype=np.float32, count=rows * self._width)
        return x.reshape(rows, self._width)


def peak_mb() -> float:
    """The high-water mark of the resident set since the last reset, in MB."""
    return _status_kb("VmHWM") / 1024


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(method: str, n: int, path: str, batch_size: int) -> dict:
    model = dense_head()
    if method == "in-memory":
        outputs = [model.get_layer(name).output for name in LAYERS]
        tap = keras.Model(model.inputs, outputs)

        def run(rows):
            acts = tap.predict(FileRows(path, rows, batch_size), verbose=0)
            return [
                (a.mean(0, dtype=np.float64), a.var(0, dtype=np.float64)) for a in acts
            ]

    elif method == "stats":

        def run(rows):
            data = FileRows(path, rows, batch_size)
            return surgery.activation_stats(model, LAYERS, data, verbose=0)

    else:

        def run(rows):
            data = np.load(path, mmap_mode="r")[:rows]
            return surgery.activation_stats(
                model, LAYERS, data, batch_size=batch_size, verbose=0
            )

    run(batch_size)  # warm-up: tracing and the first allocations
    gc.collect()
    reset_peak()
    baseline = rss_mb()
    start = time.perf_counter()
    run(n)
    return {
        "method": method,
        "n": n,
        "baseline_mb": baseline,
        "peak_mb": peak_mb(),
        "ru_maxrss_mb": ru_maxrss_mb(),
        "seconds": time.perf_counter() - start,
    }


def write_data(path: Path, n: int) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 25088))
    for lo in range(0, n, 1000):
        hi = min(n, lo + 1000)
        out[lo:hi] = features(hi - lo, seed=lo)
    out.flush()
    del out


def run(sizes: list[int], batch_size: int, log=print) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="surgery-bench-") as tmp:
        path = Path(tmp) / "features.npy"
        start = time.perf_counter()
        write_data(path, max(sizes))
        log(
            f"  wrote {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s"
        )
        for n in sizes:
            for method in METHODS:
                if method == "stats-memmap" and n not in sizes[:2]:
                    continue  # two sizes show the mapping's growth
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.memory",
                    "--child",
                    method,
                    "--n",
                    str(n),
                    "--path",
                    str(path),
                    "--batch-size",
                    str(batch_size),
                ]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, env=env, cwd=root
                )
                if out.returncode:
                    raise RuntimeError(
                        f"{method} N={n} failed: {out.stderr.strip()[-2000:]}"
                    )
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                log(
                    f"  {method} N={n}: peak {r['peak_mb']:.0f} MB (baseline {r['baseline_mb']:.0f} MB), {r['seconds']:.0f} s"
                )
    peak = {(r["method"], r["n"]): r["peak_mb"] for r in results}
    ends = {m: [n for n in sizes if (m, n) in peak] for m in METHODS}
    growth = {m: peak[m, ends[m][-1]] / peak[m, ends[m][0]] - 1 for m in METHODS}
    peak_mb_growth = {m: peak[m, ends[m][-1]] - peak[m, ends[m][0]] for m in METHODS}
    return {
        "sizes": sizes,
        "batch_size": batch_size,
        "runs": results,
        "growth": growth,
        "growth_mb": peak_mb_growth,
        "growth_sizes": {m: [ends[m][0], ends[m][-1]] for m in METHODS},
        "target": 0.05,
        "met": growth["stats"] <= 0.05,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=METHODS, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    a = parser.parse_args()
    print(json.dumps(child(a.child, a.n, a.path, a.batch_size)))
