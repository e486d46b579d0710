"""validation.json, validation.md, a terminal table and validation.png (accuracy against latency)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    largest = str(max(batch_sizes))
    return columns + [
        (f"img/s b{largest}", lambda r: r["latency"][largest]["images_per_s"], "{:.0f}"),
        ("load s", "load_seconds", "{:.2f}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
        ("file MB", "file_mb", "{:.2f}")]


def _cells(row: dict, columns: list) -> list[str]:
    return [fmt.format(key(row) if callable(key) else row[key]) for _, key, fmt in columns]


def table_rows(validation) -> tuple[list[str], list[list[str]]]:
    columns = COLUMNS + _latency_columns(validation.settings["batch_sizes"])
    rows = [_cells(r, columns) + ["FAIL" if r["variant"] in validation.failures else "ok"] for r in validation.rows]
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
    gate = validation.gate
    out += ["", f"Gate: accuracy drop ≤ {gate['max_drop_pts']} pts by precision, agreement ≥ {gate['min_agreement']}."]
    out += [f"- FAIL {name}: {'; '.join(reasons)}" for name, reasons in validation.failures.items()]
    return "\n".join(out) + "\n"


def plot(validation, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = str(min(validation.settings["batch_sizes"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    largest = max(row["file_mb"] for row in validation.rows)
    for row in validation.rows:
        failed = row["variant"] in validation.failures
        ax.scatter(row["latency"][batch]["p50_ms"], 100 * row["accuracy"], s=30 + 600 * row["file_mb"] / largest,
                   alpha=0.6, color="tab:red" if failed else "tab:blue")
        ax.annotate(row["variant"], (row["latency"][batch]["p50_ms"], 100 * row["accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"batch-{batch} latency p50 (ms, log scale)")
    ax.set_ylabel(f"top-1 accuracy on {validation.split} (%)")
    ax.set_title("accuracy vs latency (marker area ~ file size; red: fails the gate)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_reports(validation, run_dir: Path) -> list[Path]:
    paths = [run_dir / "validation.json", run_dir / "validation.md", run_dir / "validation.png"]
    atomic_write_text(paths[0], json.dumps(dataclasses.asdict(validation), indent=2) + "\n")
    atomic_write_text(paths[1], markdown(validation, run_dir))
    plot(validation, paths[2])
    return paths
