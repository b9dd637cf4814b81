"""Render results.json as Markdown."""

from __future__ import annotations

from benchmarks import payoff_report


def _yes(met) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


def _ratio(row) -> str:
    return f"{row['ratio']:.3f}x ({row['ratio_min']:.2f}–{row['ratio_max']:.2f})"


def _target(t) -> str:
    return "—" if t is None else f"<= {t:g}x"


def _ratio_table(rows, a_label="A", b_label="B") -> list[str]:
    out = [
        f"| case | {a_label} (median s) | {b_label} (median s) | ratio A/B, median (min–max) | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["measured"].split(" / ")
        out.append(
            f"| {r['name']} | {a}: {r['a_median_s']:.2f} | {b}: {r['b_median_s']:.2f} "
            f"| {_ratio(r)} | {_target(r['target'])} | {_yes(r['met'])} |"
        )
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["sections"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['ram_gib']} GiB RAM; Python {m['python']}, Keras {m['keras']}, "
        f"TensorFlow {m['tensorflow']} ({m['backend']}), NumPy {m['numpy']}; "
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
    if "overhead" in s:
        sec = s["overhead"]
        lines += [
            "## 1. Statistics overhead vs the bare forward pass",
            "",
            _meta(sec),
            "",
            *_ratio_table(sec["data"]),
            "",
            "Taps: "
            + "; ".join(
                f"{r['name']}: {r['note']}, {r['samples']} samples" for r in sec["data"]
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
    if "accuracy" in s:
        d = s["accuracy"]["data"]
        lines += [
            "## 5. Numerical accuracy (float32, mean 1e4, std 1e-2)",
            "",
            f"{d['n']:,} rows x {d['cols']} columns; reference: numpy float64 two-pass "
            f"(variance {d['reference_var_example']:.6g} in column 0). Largest relative "
            f"error over the columns. Target for ours: <= {d['target']:g} ({_yes(d['met'])}).",
            "",
            "| method | mean rel. error | variance rel. error | variance, column 0 |",
            "|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(
                f"| {r['method']} | {r['mean_rel_err']:.2e} | {r['var_rel_err']:.2e} "
                f"| {r['var_example']:.6g} |"
            )
        lines.append("")
    if "zoo" in s:
        lines += _zoo(s["zoo"])
    if "payoff" in s:
        lines += payoff_report.markdown(s["payoff"])
    return "\n".join(lines) + "\n"


def _meta(sec) -> str:
    quick = ", --quick sizes" if sec["quick"] else ""
    return f"_{sec['repeats']} repeats{quick}, section took {sec['seconds']:.0f} s_"


def _summary(s) -> list[str]:
    rows = []
    for key in ("overhead", "taps", "rebuild", "convert", "decode"):
        for r in s.get(key, {}).get("data", []):
            if r["target"] is not None:
                rows.append(
                    (r["name"], f"{r['ratio']:.3f}x", _target(r["target"]), r["met"])
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
    if "accuracy" in s:
        d = s["accuracy"]["data"]
        err = max(d["rows"][0]["mean_rel_err"], d["rows"][0]["var_rel_err"])
        rows.append(
            (
                "mean/variance rel. error, mean 1e4 std 1e-2",
                f"{err:.1e}",
                "<= 1e-9",
                d["met"],
            )
        )
    if "zoo" in s:
        d = s["zoo"]["data"]
        ok = sum(r["identical"] and r["exact_units"] == r["units"] for r in d["rows"])
        rows.append(
            (
                "zoo: bit-identical with every unit exact",
                f"{ok} of {len(d['rows'])} built ({len(d['failures'])} did not build)",
                "all",
                ok == len(d["rows"]),
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


def _zoo(sec) -> list[str]:
    d = sec["data"]
    out = [
        "## 6. Exactness over keras.applications (weights=None, BN after every Conv/Dense)",
        "",
        _meta(sec).replace(f"{sec['repeats']} repeats", "one run per model")
        + f"; {d['samples']} uniform 0..255 images through each model's preprocess_input",
        "",
        "| model | input | params | taps | units | units exact | identical | max ulp diff | rebuild s | stats s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        out.append(
            f"| {r['model']} | {r['input']} | {r['params'] / 1e6:.1f}M | {r['taps']} "
            f"| {r['units']:,} | {r['exact_units']:,} | {_yes(r['identical'])} "
            f"| {r['max_ulp_diff']} | {r['rebuild_s']:.2f} | {r['stats_s']:.2f} |"
        )
    out += [
        "",
        "Compiled inference: `insert_identity_bn(..., stats=, data=)` (its compiled "
        "check on), then `verify(mode=...)`; `weights=None` and pretrained-like "
        "weights (`surgery.synthetic.pretrained_like`: trained-looking BN "
        "statistics and non-zero biases). Cells: identical (max ulp / the "
        "original's own batch-size noise); f64 = BNs given float64.",
        "",
        "| model | weights | f64 BNs | graph | XLA | insert warned |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        for kind, c in r.get("compiled", {}).items():
            out.append(
                f"| {r['model']} | {kind} | {c['float64_bns']}/{c['bns']} "
                f"| {_mode_cell(c['graph'])} | {_mode_cell(c['xla'])} "
                f"| {_yes(c['warned'])} |"
            )
    refused = [f"{r['model']}: {x}" for r in d["rows"] for x in r["refused"]]
    out += [
        "",
        "Layers surgery refused: " + ("; ".join(refused) if refused else "none") + ".",
    ]
    if d["failures"]:
        out += ["", "Did not build or run:", ""]
        out += [f"- {f['model']}: {f['reason']}" for f in d["failures"]]
    return out + [""]
