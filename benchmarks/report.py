"""Render results.json as Markdown."""

from __future__ import annotations

from benchmarks import payoff_report


def _yes(met) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def _ratio(row) -> str:
    return f"{row['ratio']:.3f}x ({row['ratio_min']:.2f}–{row['ratio_max']:.2f})"


def _target(t) -> str:
    return "—" if t is None else f"<= {t:g}x"


def _ratio_table(rows, a_label="A", b_label="B", backends=None) -> list[str]:
    """The ratio rows; with `backends` (one name per row), a backend column."""
    first = "| backend " if backends else ""
    out = [
        f"{first}| case | {a_label} (median s) | {b_label} (median s) | ratio A/B, median (min–max) | target | met |",
        "|---" * (7 if backends else 6) + "|",
    ]
    for i, r in enumerate(rows):
        a, b = r["measured"].split(" / ")
        cell = f"| {backends[i]} " if backends else ""
        out.append(
            f"{cell}| {r['name']} | {a}: {r['a_median_s']:.2f} | {b}: {r['b_median_s']:.2f} "
            f"| {_ratio(r)} | {_target(r['target'])} | {_yes(r['met'])} |"
        )
    return out


BACKENDS = ("tensorflow", "jax", "torch")


def by_backend(s: dict, name: str) -> list[tuple[str, dict]]:
    """The runs of section `name` on each backend: TensorFlow's is `name`,
    the others' `name@backend`."""
    keys = [(b, name if b == "tensorflow" else f"{name}@{b}") for b in BACKENDS]
    return [(b, s[k]) for b, k in keys if k in s]


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["sections"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_gib']} GiB RAM; Python {m['python']}, Keras {m['keras']}, "
        f"TensorFlow {m['tensorflow']}, JAX {m.get('jax')}, torch {m.get('torch')} "
        f"(last run on {m['backend']}), NumPy {m['numpy']}; "
        f"{m['platform']}. Last run {m['date']}: `{results.get('command', '')}` "
        f"({results.get('wall_seconds', 0) / 60:.1f} min; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}).",
        "",
        "Every ratio is the median of per-repeat ratios of two measurements taken "
        "in the same run on the same data with the same batch size (32), "
        "interleaved A,B,B,A,..., after one untimed warm-up call of each.",
        "",
    ]
    lines += _summary(s)
    runs = by_backend(s, "overhead")
    if runs:
        rows = [r for _, sec in runs for r in sec["data"]]
        lines += [
            "## 1. Statistics overhead vs the bare forward pass",
            "",
            "; ".join(f"{b}: {_meta(sec)}" for b, sec in runs),
            "",
            *_ratio_table(rows, backends=[b for b, sec in runs for _ in sec["data"]]),
            "",
            "Taps: "
            + "; ".join(
                f"{r['name']}: {r['note']}, {r['samples']} samples"
                for r in runs[0][1]["data"]
            )
            + ".",
            "",
        ]
    if "memory" in s:
        d = s["memory"]["data"]
        runs = {(r["method"], r["n"]): r for r in d["runs"]}
        lines += [
            "## 2. Peak memory vs number of samples (25088-d features, VGG16 head)",
            "",
            f"_one fresh process per cell (peak RSS does not vary like timings), section took {s['memory']['seconds']:.0f} s; batch size {d['batch_size']}; peak = VmHWM (the high-water RSS that ru_maxrss reports) after the pass, reset after model build and warm-up; baseline = RSS at that reset (model weights included)_",
            "",
            "| N | data on disk | activation_stats peak RSS (above baseline) | in-memory recipe peak RSS (above baseline) | activation_stats on np.memmap peak RSS (above baseline) |",
            "|---|---|---|---|---|",
        ]
        for n in d["sizes"]:
            cells = [
                f"{runs[k, n]['peak_mb']:.0f} MB (+{runs[k, n]['peak_mb'] - runs[k, n]['baseline_mb']:.0f})"
                if (k, n) in runs
                else "—"
                for k in ("stats", "in-memory", "stats-memmap")
            ]
            lines.append(
                f"| {n:,} | {n * 25088 * 4 / 2**20:,.0f} MB | "
                + " | ".join(cells)
                + " |"
            )
        g = d["growth"]
        lines += [
            "",
            f"Peak RSS growth from N={d['sizes'][0]:,} to N={d['sizes'][-1]:,}: "
            f"activation_stats **{g['stats']:+.1%}** ({d['growth_mb']['stats']:+.0f} MB; target <= +5%: {_yes(d['met'])}), "
            f"in-memory recipe {g['in-memory']:+.1%} ({d['growth_mb']['in-memory']:+.0f} MB), activation_stats on a memmap "
            f"{g['stats-memmap']:+.1%} from N={d['growth_sizes']['stats-memmap'][0]:,} to {d['growth_sizes']['stats-memmap'][1]:,} ({d['growth_mb']['stats-memmap']:+.0f} MB: pages of the mapping that were read count in RSS).",
            "",
        ]
    if "taps" in s:
        lines += [
            "## 3. One pass for many taps (VGG16 trunk, 32x32)",
            "",
            _meta(s["taps"]) + f"; {s['taps']['data'][0]['samples']} samples",
            "",
            *_ratio_table(s["taps"]["data"]),
            "",
        ]
    if "rebuild" in s:
        lines += [
            "## 4. Rebuild cost (stats given, no data pass; BN after every Conv/Dense)",
            "",
            _meta(s["rebuild"]),
            "",
            *_ratio_table(s["rebuild"]["data"]),
            "",
        ]
    for key, title in (
        ("convert", "## 7. `convert` vs a bare forward pass of the original"),
        ("decode", "## 8. Statistics pass over a folder of JPEGs (224x224)"),
    ):
        if key in s:
            lines += [title, "", _meta(s[key]), "", *_ratio_table(s[key]["data"]), ""]
    runs = by_backend(s, "accuracy")
    if runs:
        d = runs[0][1]["data"]
        lines += [
            "## 5. Numerical accuracy (float32, mean 1e4, std 1e-2)",
            "",
            f"{d['n']:,} rows x {d['cols']} columns; reference: numpy float64 two-pass "
            f"(variance {d['reference_var_example']:.6g} in column 0). Largest relative "
            f"error over the columns. Target for ours: <= {d['target']:g} ("
            + ", ".join(f"{b}: {_yes(sec['data']['met'])}" for b, sec in runs)
            + "). The numpy rows do not depend on the backend.",
            "",
            "| backend | method | rows | mean rel. error | variance rel. error | variance, column 0 |",
            "|---|---|---|---|---|---|",
        ]
        for b, sec in runs:
            for r in sec["data"]["rows"][: None if b == runs[0][0] else 1]:
                lines.append(
                    f"| {b} | {r['method']} | {sec['data']['n']:,} "
                    f"| {r['mean_rel_err']:.2e} | {r['var_rel_err']:.2e} "
                    f"| {r['var_example']:.6g} |"
                )
        lines.append("")
    runs = by_backend(s, "zoo")
    if runs:
        lines += _zoo(runs)
    if "payoff" in s:
        lines += payoff_report.markdown(s["payoff"])
    return "\n".join(lines) + "\n"


def _meta(sec) -> str:
    quick = ", --quick sizes" if sec["quick"] else ""
    return f"_{sec['repeats']} repeats{quick}, section took {sec['seconds']:.0f} s_"


def _summary(s) -> list[str]:
    rows = []
    for key in ("overhead", "taps", "rebuild", "convert", "decode"):
        for backend, sec in by_backend(s, key):
            tag = "" if backend == "tensorflow" else f" ({backend})"
            for r in sec["data"]:
                if r["target"] is not None:
                    rows.append(
                        (
                            r["name"] + tag,
                            f"{r['ratio']:.3f}x",
                            _target(r["target"]),
                            r["met"],
                        )
                    )
    if "memory" in s:
        d = s["memory"]["data"]
        rows.append(
            (
                f"activation_stats peak RSS growth N={d['sizes'][0]:,} → {d['sizes'][-1]:,}",
                f"{d['growth']['stats']:+.1%}",
                "<= +5%",
                d["met"],
            )
        )
    for backend, sec in by_backend(s, "accuracy"):
        d = sec["data"]
        err = max(d["rows"][0]["mean_rel_err"], d["rows"][0]["var_rel_err"])
        rows.append(
            (
                f"mean/variance rel. error, mean 1e4 std 1e-2 ({backend})",
                f"{err:.1e}",
                "<= 1e-9",
                d["met"],
            )
        )
    for backend, sec in by_backend(s, "zoo"):
        d = sec["data"]
        ok = sum(r["identical"] and r["exact_units"] == r["units"] for r in d["rows"])
        rows.append(
            (
                f"zoo: bit-identical with every unit exact ({backend})",
                f"{ok} of {len(d['rows'])} built ({len(d['failures'])} did not build)",
                "all" if backend != "torch" else "—",
                ok == len(d["rows"]) if backend != "torch" else None,
            )
        )
    if not rows:
        return []
    out = ["## Summary", "", "| figure | value | target | met |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {_yes(d)} |" for a, b, c, d in rows]
    return out + [""]


def _mode_cell(m) -> str:
    if "error" in m:
        return m["error"]
    return f"{_yes(m['identical'])} ({m['max_ulp']} / {m['noise_ulp']})"


def _zoo(runs) -> list[str]:
    out = [
        "## 6. Exactness over keras.applications (weights=None, BN after every Conv/Dense)",
        "",
        "; ".join(
            f"{b}: "
            + _meta(sec).replace(f"{sec['repeats']} repeats", "one run per model")
            + f", {sec['data']['samples']} images"
            for b, sec in runs
        )
        + "; uniform 0..255 images through each model's preprocess_input. On torch "
        "the default keeps the measured moving mean (not an exact identity there, "
        "see the README); `zero_mean` rows are the opt-in.",
        "",
        "| backend | model | input | params | taps | units | units exact | identical | max ulp diff | rebuild s | stats s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, sec in runs:
        for r in sec["data"]["rows"]:
            variant = " (zero_mean)" if r.get("zero_mean") else ""
            out.append(
                f"| {b}{variant} | {r['model']} | {r['input']} | {r['params'] / 1e6:.1f}M | {r['taps']} "
                f"| {r['units']:,} | {r['exact_units']:,} | {_yes(r['identical'])} "
                f"| {r['max_ulp_diff']} | {r['rebuild_s']:.2f} | {r['stats_s']:.2f} |"
            )
    out += [
        "",
        "Compiled inference: `insert_identity_bn(..., stats=, data=)` (its compiled "
        "check on), then `verify(mode=...)`; `weights=None` and pretrained-like "
        "weights (`surgery.testing.synthetic.pretrained_like`: trained-looking BN "
        "statistics and non-zero biases). Cells: identical (max ulp / the "
        "original's own batch-size noise); f64 = BNs given float64.",
        "",
        "| backend | model | weights | f64 BNs | graph | XLA | insert warned |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, sec in runs:
        for r in sec["data"]["rows"]:
            for kind, c in r.get("compiled", {}).items():
                out.append(
                    f"| {b} | {r['model']} | {kind} | {c['float64_bns']}/{c['bns']} "
                    f"| {_mode_cell(c['graph'])} | {_mode_cell(c['xla'])} "
                    f"| {_yes(c['warned'])} |"
                )
    refused = [
        f"{r['model']}: {x}"
        for _, sec in runs
        for r in sec["data"]["rows"]
        for x in r["refused"]
    ]
    out += [
        "",
        "Layers surgery refused: "
        + ("; ".join(sorted(set(refused))) if refused else "none")
        + ".",
    ]
    failures = [(b, f) for b, sec in runs for f in sec["data"]["failures"]]
    if failures:
        out += ["", "Did not build or run:", ""]
        out += [f"- {f['model']} ({b}): {f['reason']}" for b, f in failures]
    return out + [""]
