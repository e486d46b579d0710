"""validation.json, validation.md, a terminal table and validation.png (accuracy against latency)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from edgekd.errors import EdgekdError
from edgekd.runs import atomic_write, atomic_write_text

COLUMNS = [  # (header, row key or function, format)
    ("variant", "variant", "{}"), ("acc %", lambda r: 100 * r["accuracy"], "{:.2f}"),
    ("Δacc pts", "accuracy_change_pts", "{:+.2f}"), ("agree", "agreement", "{:.4f}"),
    ("max|Δp|", "max_abs_dprob", "{:.4f}"), ("mean|Δp|", "mean_abs_dprob", "{:.5f}"),
    ("worst class Δpts", lambda r: f"{r['worst_class']} {r['worst_class_change_pts']:+.1f}", "{}"),
]


def _latency_columns(batch_sizes: list[int]) -> list:
    columns = []
    for b in batch_sizes:
        for q in ("p50", "p90", "p99"):
            columns.append((f"b{b} {q} ms", lambda r, b=b, q=q: r["latency"][str(b)][f"{q}_ms"], "{:.2f}"))
        columns.append((f"b{b} runs", lambda r, b=b: r["latency"][str(b)].get("runs", "?"), "{}"))
    largest = str(max(batch_sizes))
    return columns + [
        (f"img/s b{largest}", lambda r: r["latency"][largest]["images_per_s"], "{:.0f}"),
        ("load s", "load_seconds", "{:.2f}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
        ("file MB", "file_mb", "{:.2f}")]


def _cells(row: dict, columns: list) -> list[str]:
    cells = []
    for _, key, fmt in columns:
        try:
            cells.append(fmt.format(key(row) if callable(key) else row[key]))
        except (KeyError, TypeError, ValueError):  # an earlier row timed at other batch sizes
            cells.append("–")
    return cells


def _gate_cell(row: dict, validation) -> str:
    if row.get("kept_from_earlier"):
        return f"{'FAIL' if row.get('gate_failures') else 'ok'} (earlier, {row.get('measured_at') or '?'})"
    if not row["gated"]:
        return "reference" if row["variant"] == validation.settings["reference"] else "context"
    return "FAIL" if row["variant"] in validation.failures else "ok"


def table_rows(validation) -> tuple[list[str], list[list[str]]]:
    columns = COLUMNS + _latency_columns(validation.settings["batch_sizes"])
    rows = [_cells(r, columns) + [_gate_cell(r, validation)] for r in validation.rows]
    return [h for h, _, _ in columns] + ["gate"], rows


def terminal_table(validation) -> str:
    headers, rows = table_rows(validation)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def markdown(validation, run_dir: Path) -> str:
    headers, rows = table_rows(validation)
    d = validation.device
    out = [f"# Validation of {run_dir.name}", "",
           f"{validation.images} images of the {validation.split} split; reference: "
           f"{validation.settings['reference']}; {validation.settings['threads']} threads; latency after warm-up.",
           "", f"Device: {d['cpu']} ({d['physical_cores']} physical / {d['logical_cores']} logical cores; "
           f"{', '.join(d['instruction_sets']) or 'no AVX-512/VNNI/AMX'}); GPU: {d['gpu']}; "
           f"onnxruntime {d['onnxruntime']}; OpenVINO {d.get('openvino') or 'not installed'}; torch {d['torch']}.", "",
           "| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",  # max|Δp| would split a cell
           "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if validation.skipped:
        out += ["", "Skipped:", ""] + [f"- {s['variant']} ({s['file']}): {s['reason']}" for s in validation.skipped]
    if validation.warnings:
        out += ["", "Warnings:", ""] + [f"- {w}" for w in validation.warnings]
    for line in earlier_lines(validation):
        out += ["", line]
    gate = validation.gate
    out += ["", f"Gate: accuracy drop ≤ {gate['max_drop_pts']} pts by precision, agreement ≥ {gate['min_agreement']}."]
    out += [f"- FAIL {name}: {'; '.join(reasons)}" for name, reasons in validation.failures.items()]
    return "\n".join(out) + "\n"


def earlier_lines(validation) -> list[str]:
    """What became of the earlier validation files, in words."""
    earlier = validation.earlier or {}
    lines = []
    if earlier.get("kept_rows"):
        lines.append(f"kept {len(earlier['kept_rows'])} earlier row(s) this run did not measure again, marked "
                     f"'earlier' with their date: {', '.join(earlier['kept_rows'])}")
    if earlier.get("kept_beside"):
        lines.append(f"earlier results kept beside ({earlier.get('why_beside')}): "
                     f"{', '.join(Path(p).name for p in earlier['kept_beside'])}")
    return lines


def _axis_range(values: list[float], log: bool, least: float) -> tuple[float, float]:
    """Limits that hold every value with a margin (a factor on a log axis), at least `least` wide."""
    low, high = min(values), max(values)
    if log:
        return low / 1.6, high * 1.6
    pad = max((high - low) * 0.15, (least - (high - low)) / 2, 0.0)
    return low - pad, high + pad


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(ax, points: list[tuple[float, float, str]]) -> list:
    """Annotate each point where its label overlaps no other label and stays inside the axes: the first
    free spot on rings of growing radius around it (a leader line joins a moved label to its point)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed, texts = [], []
    for x, y, label in points:
        text = None
        for radius in (6, 14, 24, 36, 50, 66, 84, 104, 126):
            for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)):
                offset = (dx * radius, dy * radius)
                text = ax.annotate(label, (x, y), xytext=offset, textcoords="offset points", fontsize=8,
                                   ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                                   arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6} if radius > 6 else None)
                box = text.get_window_extent(renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not _overlaps(box, placed):
                    placed.append(box)
                    break
                text.remove()
                text = None
            if text is not None:
                break
        if text is None:  # nowhere free: the legend-like list below the axes names it instead
            texts.append(None)
            continue
        texts.append(text)
    return texts


def plot(validation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(validation)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def figure(validation):
    """Accuracy against latency. The exports (the deployment candidates) set the range; the PyTorch rows
    are drawn when they fall inside it, else named below the chart with their numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batch = str(min(validation.settings["batch_sizes"]))
    points = [r for r in validation.rows if batch in r.get("latency", {})]
    candidates = [r for r in points if r["runtime"] != "PyTorch eager"] or points
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if not points:
        ax.text(0.5, 0.5, "no row was measured", ha="center", va="center", transform=ax.transAxes)
        return fig
    xs = [r["latency"][batch]["p50_ms"] for r in candidates]
    ys = [100 * r["accuracy"] for r in candidates]
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):  # 0.06, not 6×10⁻²
        axis(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlim(*_axis_range(xs, True, 0))
    ax.set_ylim(*_axis_range(ys, False, 2.0))
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    largest = max(row["file_mb"] for row in points) or 1.0
    shown, outside = [], []
    for row in points:
        x, y = row["latency"][batch]["p50_ms"], 100 * row["accuracy"]
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            outside.append(f"{row['variant']}: {y:.2f}% at {x:.2f} ms")
            continue
        failed = row["variant"] in validation.failures or bool(row.get("kept_from_earlier")
                                                                and row.get("gate_failures"))
        colour = "tab:red" if failed else ("tab:grey" if row["runtime"] == "PyTorch eager" else "tab:blue")
        ax.scatter(x, y, s=30 + 600 * row["file_mb"] / largest, alpha=0.6, color=colour,
                   marker="s" if row["runtime"] == "PyTorch eager" else "o")
        shown.append((x, y, row["variant"] + (" (earlier)" if row.get("kept_from_earlier") else "")))
    ax.set_xlabel(f"batch-{batch} latency p50 (ms, log scale)")
    ax.set_ylabel(f"top-1 accuracy on {validation.split} (%)")
    ax.set_title("accuracy vs latency (marker area ~ file size; red: fails the gate; grey squares: PyTorch)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.08 if outside else 0, 1, 1))
    fig.canvas.draw()
    texts = place_labels(ax, shown)
    unplaced = [label for (_, _, label), text in zip(shown, texts) if text is None]
    notes = ([f"off the chart: {'; '.join(outside)}"] if outside else []) + (
        [f"not labelled (no room): {', '.join(unplaced)}"] if unplaced else [])
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", wrap=True)
    return fig


def write_reports(validation, run_dir: Path) -> list[Path]:
    paths = [run_dir / "validation.json", run_dir / "validation.md", run_dir / "validation.png"]
    try:
        atomic_write_text(paths[0], json.dumps(dataclasses.asdict(validation), indent=2) + "\n")
        atomic_write_text(paths[1], markdown(validation, run_dir))
        plot(validation, paths[2])
    except OSError as exc:
        raise EdgekdError(f"cannot write the validation results into {run_dir} ({exc.strerror or exc})",
                          hint="make the run folder writable, or copy the run somewhere writable") from exc
    return paths
