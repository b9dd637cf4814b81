"""Run the benchmarks and write results.md and results.json.

    python -m benchmarks [--quick] [--only NAME ...] [--repeats N]
    python benchmarks/run.py ...

Sections: overhead, memory, taps, rebuild, accuracy, zoo, convert, decode,
and payoff (a fine-tuning experiment, run only when named: --only payoff;
--plot draws its figure). With --only, the sections that ran replace their
entries in the existing results.json and the Markdown is regenerated from
all of it. Run with KERAS_BACKEND=jax or torch, a section is stored as
`name@backend` next to TensorFlow's, and the tables get a row per backend:

    KERAS_BACKEND=jax python -m benchmarks --only overhead --only accuracy --only zoo
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import payoff_report, report  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "overhead",
    "memory",
    "taps",
    "rebuild",
    "accuracy",
    "zoo",
    "convert",
    "decode",
    "payoff",
)
DEFAULT_SECTIONS = SECTIONS[:-1]  # payoff is an experiment, not a ratio: on request

SIZES = {
    "full": {
        "overhead": {"head": 512, "vgg": 256, "resnet": 512},
        "memory": [1000, 5000, 20000],
        "taps": 128,
        "accuracy": 2_000_000,
        "zoo": 128,
        "convert": 7500,
        "decode": {"cheap": 600, "vgg16": 64},
        "repeats": 5,
    },
    "quick": {
        "overhead": {"head": 128, "vgg": 128, "resnet": 128},
        "memory": [256, 512, 1024],
        "taps": 64,
        "accuracy": 200_000,
        "zoo": 16,
        "convert": 1000,
        "decode": {"cheap": 96, "vgg16": 32},
        "repeats": 3,
    },
}


def machine() -> dict:
    def first(path, key):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    import importlib.metadata

    import keras
    import numpy

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    mem_kb = first("/proc/meminfo", "MemTotal")
    return {
        "cpu": first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
        "jax": version("jax"),
        "torch": version("torch"),
        "numpy": numpy.__version__,
        "backend": keras.backend.backend(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, for a smoke run"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="NAME",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per figure (>= 3)")
    parser.add_argument(
        "--zoo-all",
        action="store_true",
        help="zoo: every keras.applications architecture, not the default subset",
    )
    parser.add_argument(
        "--zoo-models",
        help="zoo: these architectures (comma-separated names), not the subset",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="payoff: also write payoff.png (accuracy vs learning rate) to --out",
    )
    parser.add_argument(
        "--out", type=Path, default=HERE, help="directory for results.md/json"
    )
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    repeats = max(3, args.repeats or sizes["repeats"])
    sections = args.only or list(DEFAULT_SECTIONS)

    import keras

    from benchmarks import cases, memory, passes, payoff, zoo  # after argparse

    on_tf = keras.backend.backend() == "tensorflow"
    subset = list(zoo.DEFAULT if on_tf else zoo.OTHER_BACKENDS)
    if args.zoo_models:
        subset = [name.strip() for name in args.zoo_models.split(",")]

    def log(msg):
        print(msg, flush=True)

    fewer = max(3, repeats - 2)
    section_repeats = {"taps": fewer, "rebuild": fewer}
    runners = {
        "overhead": lambda: cases.overhead(sizes["overhead"], repeats, log),
        "memory": lambda: memory.run(sizes["memory"], 128, log),
        "taps": lambda: cases.many_taps(sizes["taps"], section_repeats["taps"], log),
        "rebuild": lambda: cases.rebuild(section_repeats["rebuild"], log),
        "accuracy": lambda: cases.accuracy(sizes["accuracy"], log=log),
        "zoo": lambda: zoo.run(sizes["zoo"], None if args.zoo_all else subset, log=log),
        "payoff": lambda: payoff.run(args.quick, log),
        "convert": lambda: passes.convert(sizes["convert"], repeats, log),
        "decode": lambda: passes.decode(sizes["decode"], repeats, fewer, log),
    }
    json_path = args.out / "results.json"
    results = (
        json.loads(json_path.read_text()) if args.only and json_path.exists() else {}
    )
    results.setdefault("sections", {})
    previous = results.get("machine", {})
    results["machine"] = machine()
    if results["machine"]["tensorflow"] is None:  # TF rows keep their version
        results["machine"]["tensorflow"] = previous.get("tensorflow")
    backend = results["machine"]["backend"]
    started = time.perf_counter()
    for name in sections:
        log(f"[{name}]")
        start = time.perf_counter()
        data = runners[name]()
        key = name if backend == "tensorflow" else f"{name}@{backend}"
        results["sections"][key] = {
            "backend": backend,
            "quick": args.quick,
            "repeats": section_repeats.get(name, repeats),
            "seconds": time.perf_counter() - start,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "data": data,
        }
        log(f"[{name}] {results['sections'][key]['seconds']:.0f} s")
    results["command"] = " ".join(
        ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
    )
    results["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    if args.plot and "payoff" in results["sections"]:
        payoff_report.plot(results["sections"]["payoff"], args.out / "payoff.png")
        log(f"wrote {args.out / 'payoff.png'}")
    log(
        f"wrote {json_path} and {args.out / 'results.md'} ({results['wall_seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
