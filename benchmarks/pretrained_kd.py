"""Does distillation pay? The fine-tuned pretrained teacher, students with and without it, unlabeled photos.

One command, resumable (a finished run is kept, an interrupted one continues from its newest saved state):

    python benchmarks/pretrained_kd.py --data DEST --artifacts /path/to/runs

where DEST is what ../shared/datasets/intel-image-classification/assemble.sh DEST lays out (the whole
Kaggle seg_train, 14,033 photos). Every choice is made on the recipes' held-out val split (10% of
seg_train, stratified, split_seed 0); seg_test is never read. Rows, each a subprocess of `edgekd`:

  teacher       edgekd train   recipes/intel_lite0_teacher.yaml    EfficientNet-Lite0, ImageNet, 150 px
  8-block       edgekd train / distill recipes/intel_8block_lite0.yaml   seeds 0 and 1, 64 px
  4-block       edgekd train / distill recipes/intel_4block_lite0.yaml   seed 0
  half labels   the 8-block distilled with the labels of half of the training photos hidden (stratified,
                seeded): that half dropped, or kept as unlabeled photos (only the distillation term sees them)

Every student row has the same epoch budget (--epochs). Prints a markdown table: last-epoch and best val
accuracy (mean ± spread over seeds, the spread being half the range), the KD gain over no-KD, and every
row's wall time (summed over attempts when a run was resumed); writes it with every run's numbers to
<artifacts>/pretrained_kd.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from timed_run import run_timed, summary_of, wall_seconds_file  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent
DONE = {"finished", "early_stopped"}
HALF = ("data.label_fraction=0.5",)


@dataclass
class Row:
    key: str
    label: str
    command: str  # train or distill
    recipe: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()
    baseline: str | None = None  # the no-KD row this KD row is compared with


ROWS = [
    Row("teacher", "teacher · EfficientNet-Lite0 (ImageNet) fine-tuned, 150 px", "train", "intel_lite0_teacher.yaml",
        (0,)),
    Row("s8_nokd", "8-block · no KD", "train", "intel_8block_lite0.yaml", (0, 1)),
    Row("s8_kd", "8-block · KD from the teacher (baseline: no KD)", "distill", "intel_8block_lite0.yaml", (0, 1), baseline="s8_nokd"),
    Row("s4_nokd", "4-block · no KD", "train", "intel_4block_lite0.yaml", (0,)),
    Row("s4_kd", "4-block · KD from the teacher (baseline: no KD)", "distill", "intel_4block_lite0.yaml", (0,), baseline="s4_nokd"),
    Row("s8_half", "8-block · KD, labels of half hidden, that half dropped", "distill", "intel_8block_lite0.yaml",
        (0,), HALF),
    Row("s8_half_unl", "8-block · KD, labels of half hidden, that half as unlabeled photos (baseline: the row above)",
        "distill",
        "intel_8block_lite0.yaml", (0,), (*HALF, "data.hidden_labels=unlabeled"), baseline="s8_half"),
]


def run_one(args, row: Row, seed: int) -> dict:
    name = f"{row.key}_s{seed}"
    summary = summary_of(args.artifacts, name)
    if summary and summary["status"] in DONE:
        return summary
    teacher = args.artifacts / "teacher_s0" / "best.pt"
    overrides = [f"name={name}", f"data.root={args.data}", f"train.seed={seed}", *row.overrides]
    if row.key != "teacher":
        overrides += [f"train.epochs={args.epochs}", f"precision={args.precision}"]
    if row.command == "distill":
        overrides.append(f"teacher.checkpoint={teacher}")
    # --resume continues an interrupted run from its newest saved state (mid-epoch included), restarts one
    # killed before its first save in its own folder, and starts the run when there is none
    cmd = [sys.executable, "-m", "edgekd", "-q", row.command, str(REPO / "recipes" / row.recipe),
           "--artifacts", str(args.artifacts), "--resume"]
    for item in overrides:
        cmd += ["--set", item]
    run_timed(cmd, args.artifacts / name, f"{name}: {' '.join(cmd[3:])}")
    return summary_of(args.artifacts, name)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def result(args, name: str) -> dict:
    summary = summary_of(args.artifacts, name)
    records = [json.loads(line) for line in (args.artifacts / name / "metrics.jsonl").read_text().splitlines()]
    wall = wall_seconds_file(args.artifacts / name)
    in_epochs = sum(r["seconds"] for r in records)
    timed = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    # A run continued by hand, outside this script, had attempts its wall file never saw: never report
    # less than the seconds its own epochs took.
    return {"run": name, "last_val_acc": records[-1]["val_acc"], "best_val_acc": summary["best_val_acc"],
            "epochs": summary["epochs_done"], "precision": summary["precision"]["mode"],
            "train_images": summary["dataset"]["sizes"]["train"], "unlabeled": summary["dataset"].get("unlabeled"),
            "wall_seconds": max(timed, in_epochs), "seconds_in_epochs": in_epochs}


def table(args, results: dict[str, list[dict]]) -> str:
    lines = [f"full seg_train at {args.data}, val = 10% held out (split_seed 0); students 64 px, "
             f"{args.epochs} epochs, {args.precision}; teacher 150 px; val accuracy %, mean ± half-range over seeds",
             "", "| row | seeds | train photos (unlabeled) | last-epoch val acc | best val acc | gain over its baseline | wall time |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        runs = results.get(row.key)
        if not runs:
            continue
        last = [r["last_val_acc"] for r in runs]
        gain = "–"
        if row.baseline and results.get(row.baseline):
            base = statistics.mean(r["last_val_acc"] for r in results[row.baseline])
            gain = f"{100 * (statistics.mean(last) - base):+.2f}"
        walls = [r["wall_seconds"] for r in runs]
        photos = f"{runs[0]['train_images']}" + (f" ({runs[0]['unlabeled']})" if runs[0]["unlabeled"] else "")
        lines.append(f"| {row.label} | {len(runs)} | {photos} | {spread(last)} | "
                     f"{spread([r['best_val_acc'] for r in runs])} | {gain} | "
                     f"{' + '.join(f'{w / 60:.1f}' for w in walls)} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the assembled Intel folder (assemble.sh DEST)")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=12, help="every student row's epoch budget")
    parser.add_argument("--precision", default="bf16", help="students' precision (fp32 on CPUs without bf16)")
    parser.add_argument("--only", nargs="*", help="row keys to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="run nothing; print the finished runs")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    args.artifacts = args.artifacts.resolve()
    results: dict[str, list[dict]] = {}
    # row by row: the 8-block comparison (both seeds) first, as it carries the verdict
    order = [(row, seed) for row in ROWS for seed in row.seeds]
    for row, seed in order:
        if args.only and row.key not in args.only and row.key != "teacher":
            continue
        name = f"{row.key}_s{seed}"
        if args.table_only:
            summary = summary_of(args.artifacts, name)
            if not summary or summary["status"] not in DONE:
                continue
        else:
            run_one(args, row, seed)
        results.setdefault(row.key, []).append(result(args, name))
        print(table(args, results), file=sys.stderr, flush=True)
    text = table(args, results)
    print(text)
    (args.artifacts / "pretrained_kd.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text}, indent=1))


if __name__ == "__main__":
    main()
