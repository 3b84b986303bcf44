"""``python -m sm4 bench report results.json``: comparison tables (and a plot) of a benchmark run.

The input is pytest-benchmark's JSON (``make bench`` or ``pytest benchmarks --benchmark-json F``).
Every sm4 benchmark records, in ``extra_info`` (see benchmarks/conftest.py): op, shape, backend,
FLOPs, bytes, TFLOP/s, GB/s, the fractions of the machine's measured roofline, and speedups over
the baselines measured in the same run (``speedup_over_reference``, ``..._plain_loop``,
``..._dense_mm``). The report groups the results by (op, shape), one row per backend, so the
kernels read beside their baselines; ``--markdown`` prints the same tables for BENCHMARKS.md and
``--plot`` writes a PNG (matplotlib) of the medians; ``--peers`` prints only the table of sm4
beside the best torch-native peer (benchmarks/bench_peer.py): sm4 / best peer, sm4 / dense floor,
and which rows sm4 does not win.
"""

import argparse
import json
import math
from collections import defaultdict

from ._io import pyplot, save_figure

BASELINES = ("plain_loop", "reference", "dense_mm", "dense_model", "torch_grouped_mm")


def load(path: str) -> dict:
    with open(path) as handle:
        data = json.load(handle)
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data


def rows_by_group(data: dict) -> dict[tuple[str, str], list[dict]]:
    """{(op, shape): [row, ...]} with each row's backend, median (s), spread and extra_info."""
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info or not bench.get("stats"):
            continue
        stats = bench["stats"]
        groups[(info["op"], info["shape"])].append(
            {"backend": info["backend"], "median": stats["median"], "iqr": stats.get("iqr", math.nan), "info": info}
        )
    for rows in groups.values():  # baselines first, then kernels, each by name
        rows.sort(key=lambda r: (r["backend"] not in BASELINES, r["backend"]))
    return dict(sorted(groups.items()))


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _speedups(info: dict) -> str:
    parts = [f"{info[f'speedup_over_{name}']:.2f}× vs {name}" for name in BASELINES if f"speedup_over_{name}" in info]
    return ", ".join(parts)


COLUMNS = ("backend", "median", "spread (IQR)", "TFLOP/s", "GB/s", "of matmul roofline", "speedup")


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        info = row["info"]
        out.append([
            row["backend"], _time(row["median"]), _time(row["iqr"]) if not math.isnan(row["iqr"]) else "",
            f"{info.get('TFLOPs', math.nan):.3g}", f"{info.get('GBps', math.nan):.3g}",
            f"{100 * info.get('fraction_of_matmul_roofline', math.nan):.1f} %", _speedups(info),
        ])
    return out


def machine_line(data: dict) -> str:
    machine = data.get("machine_info", {})
    first = next((b["extra_info"] for b in data["benchmarks"] if "device" in b.get("extra_info", {})), {})
    roofline = first.get("roofline", {})
    return (f"{data.get('datetime', '?')}: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
            f"device {first.get('device', '?')}, torch {first.get('torch', '?')}, sm4 {first.get('sm4', '?')}; "
            f"measured roofline: {roofline.get('matmul_TFLOPs', math.nan):.3g} TFLOP/s fp32 matmul, "
            f"{roofline.get('copy_GBps', math.nan):.3g} GB/s copy")


def render_text(data: dict) -> str:
    lines = [machine_line(data), ""]
    for (op, shape), rows in rows_by_group(data).items():
        body = table_rows(rows)
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]
        lines.append(f"{op} [{shape}]")
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        lines.extend("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body)
        lines.append("")
    return "\n".join(lines)


def render_markdown(data: dict) -> str:
    lines = [f"_{machine_line(data)}_", ""]
    for (op, shape), rows in rows_by_group(data).items():
        lines += [f"**{op}** — `{shape}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
        lines.append("")
    return "\n".join(lines)


PEER_COLUMNS = ("layer", "mode", "shape", "dtype", "threads", "sm4", "best peer", "sm4 / best peer", "dense floor",
                "sm4 / floor", "verdict")


def peer_rows(data: dict) -> list[dict]:
    """The bench_peer.py rows of a run (each sm4 result's ``extra_info["peer_comparison"]``)."""
    return [b["extra_info"]["peer_comparison"] for b in data["benchmarks"]
            if b.get("stats") and "peer_comparison" in b.get("extra_info", {})]


def _peer_cells(row: dict) -> list[str]:
    if row["sm4_fastest"]:
        verdict = "sm4 fastest"
    else:
        verdict = f"**sm4 NOT fastest** ({row['best_peer']} wins)"
    note = f"; {row['compile_note']}" if row.get("compile_note") else ""
    return [row["layer"], row["mode"], row["shape"], row["dtype"], str(row["threads"]), _time(row["sm4_s"]),
            f"{row['best_peer']} {_time(row['peer_s'][row['best_peer']])}", f"{row['sm4_over_best_peer']:.2f}",
            _time(row["floor_s"]), f"{row['sm4_over_floor']:.2f}", verdict + note]


def render_peer_table(rows: list[dict], markdown: bool = False) -> str:
    """sm4 beside the best peer: one line per (layer, mode, shape, dtype, threads); a row where
    sm4 is not the fastest says so. Ratios are times (below 1: sm4 is faster)."""
    body = [_peer_cells(r) for r in sorted(rows, key=lambda r: (r["layer"], r["mode"], r["shape"], r["dtype"],
                                                                  r["threads"]))]
    losses = sum(not r["sm4_fastest"] for r in rows)
    summary = f"sm4 is not the fastest in {losses} of {len(rows)} rows"
    if markdown:
        lines = ["| " + " | ".join(PEER_COLUMNS) + " |", "|" + "---|" * len(PEER_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body] + ["", summary])
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(PEER_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(PEER_COLUMNS, widths))]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body] + [summary])


def plot(data: dict, path: str) -> None:
    """A PNG of the medians: one panel per (op, shape), one bar per backend (baselines grey)."""
    plt = pyplot()
    groups = rows_by_group(data)
    if not groups:
        raise ValueError("no sm4 results with timings in this file (was it run with --benchmark-disable?)")
    columns = 3
    rows = math.ceil(len(groups) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 2.6 * rows), squeeze=False)
    for axis, ((op, shape), entries) in zip(axes.flat, groups.items()):
        names = [e["backend"] for e in entries]
        colors = ["tab:gray" if n in BASELINES else "tab:blue" for n in names]
        medians = [e["median"] * 1e3 for e in entries]
        bars = axis.barh(names, medians, color=colors)  # linear from 0: bar lengths compare
        axis.bar_label(bars, labels=[_time(e["median"]) for e in entries], fontsize=6, padding=2)
        axis.set_xlim(0, max(medians) * 1.3)
        axis.set_title(f"{op} [{shape}]", fontsize=8)
        axis.set_xlabel("median ms", fontsize=7)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(groups):]:
        axis.axis("off")
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark tools").add_subparsers(required=True, dest="bench_command")
    report = bench.add_parser("report", help="tables (and a plot) of a pytest-benchmark JSON file")
    report.add_argument("results", help="pytest-benchmark JSON (make bench writes them under results/)")
    report.add_argument("--markdown", action="store_true", help="print Markdown tables (for BENCHMARKS.md)")
    report.add_argument("--plot", metavar="PNG", help="also write a plot of the medians to this PNG file")
    report.add_argument("--peers", action="store_true",
                        help="print only the table of sm4 beside the best torch-native peer (bench_peer.py)")
    report.set_defaults(func=run_report)


def run_report(args) -> int:
    data = load(args.results)
    if args.peers:
        rows = peer_rows(data)
        if not rows:
            raise ValueError(f"{args.results} has no timed bench_peer.py rows")
        print(f"{machine_line(data)}\n\n{render_peer_table(rows, markdown=args.markdown)}")
        return 0
    print(render_markdown(data) if args.markdown else render_text(data))
    if args.plot:
        plot(data, args.plot)
        print(f"plot written to {args.plot}")
    return 0
