"""How much of the teacher-student gap does function matching close? No KD, KD with cached views, KD with the
live teacher, and function matching (Beyer et al. 2022), at 30 epochs and at a long schedule.

One command, resumable (a finished run is kept, an interrupted one continues from its newest saved state):

    python benchmarks/function_matching.py --data DEST --artifacts /path/to/runs [--long]

DEST is what ../shared/datasets/intel-image-classification/assemble.sh DEST lays out (Kaggle's whole
seg_train); val is the recipes' 10% hold-out (split_seed 0), seg_test is never read. The teacher is the
fine-tuned EfficientNet-Lite0 at 150 px (recipes/intel_lite0_teacher.yaml: trained here as teacher_s0
unless --teacher names a best.pt); students at 64 px. Rows, each a subprocess of `edgekd`:

  no KD          edgekd train   recipes/intel_8block_lite0.yaml (the same views, cross-entropy alone)
  KD, cached     edgekd distill recipes/intel_8block_lite0.yaml (8 stored teacher views per photo)
  KD, live       the same with distill.teacher_views: null (the teacher on every batch, no mixing)
  function m.    edgekd distill recipes/intel_8block_fm.yaml (live teacher, mixup on every batch, KL alone, T 1)

--epochs (default 30) runs each row with seeds 0 and 1 (--seeds); --long adds the long schedule (--long-epochs,
default 100, seed 0) for the 8-block, or the 4-block with --long-student 4; --long-only runs the long rows
alone. Columns: val accuracy (last epoch,
best), share of the gap closed = (student - no KD) / (teacher - no KD) on last-epoch accuracy, with no KD at
the same epochs; fidelity = top-1 agreement with the teacher on the training views of the last epoch
(metrics.jsonl's train_agreement; Stanton et al. 2021); cost per epoch (the median epoch) as a multiple of no
KD's; wall time (summed over attempts). Writes <artifacts>/function_matching.json and, per schedule,
<artifacts>/function_matching_<e30|long100>.png (val accuracy against epochs, every run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from timed_run import epoch_records, run_timed, run_wall_seconds, summary_of  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent
DONE = {"finished", "early_stopped"}
FOUR_BLOCK = ("model.blocks=4", "model.classifier=[32]")  # recipes/intel_4block_lite0.yaml's model


@dataclass
class Row:
    key: str
    label: str
    command: str  # train or distill
    recipe: str
    overrides: tuple[str, ...] = ()


ROWS = [
    Row("nokd", "no KD", "train", "intel_8block_lite0.yaml"),
    Row("kd_views", "KD, cached teacher views (K=8)", "distill", "intel_8block_lite0.yaml"),
    Row("kd_live", "KD, live teacher, no mixing", "distill", "intel_8block_lite0.yaml",
        ("distill.teacher_views=null",)),
    Row("fm", "function matching: live teacher, mixup, KL alone", "distill", "intel_8block_fm.yaml"),
]


@dataclass
class Schedule:
    key: str  # e30, long100
    epochs: int
    seeds: tuple[int, ...]
    student: int  # 8 or 4 blocks



def _edgekd(args, command: str, recipe: str, name: str, overrides: list[str]) -> None:
    # --resume continues an interrupted run from its newest saved state (mid-epoch included), restarts one
    # killed before its first save in its own folder, and starts the run when there is none
    cmd = [sys.executable, "-m", "edgekd", "-q", command, str(REPO / "recipes" / recipe),
           "--artifacts", str(args.artifacts), "--resume"]
    for item in [f"name={name}", f"data.root={args.data}", *overrides]:
        cmd += ["--set", item]
    run_timed(cmd, args.artifacts / name, f"{name}: {' '.join(cmd[3:])}")


def teacher_checkpoint(args) -> Path:
    if args.teacher:
        return Path(args.teacher)
    summary = summary_of(args.artifacts, "teacher_s0")
    if not summary or summary["status"] not in DONE:
        _edgekd(args, "train", "intel_lite0_teacher.yaml", "teacher_s0", ["train.seed=0"])
    return args.artifacts / "teacher_s0" / "best.pt"


def run_name(schedule: Schedule, row: Row, seed: int) -> str:
    return f"{schedule.key}_s{schedule.student}_{row.key}_s{seed}"


def run_one(args, teacher: Path, schedule: Schedule, row: Row, seed: int) -> None:
    name = run_name(schedule, row, seed)
    summary = summary_of(args.artifacts, name)
    if summary and summary["status"] in DONE:
        return
    overrides = [f"train.seed={seed}", f"train.epochs={schedule.epochs}", f"precision={args.precision}",
                 *(FOUR_BLOCK if schedule.student == 4 else ()), *row.overrides, *args.overrides]
    if row.command == "distill":
        overrides.append(f"teacher.checkpoint={teacher}")
    _edgekd(args, row.command, row.recipe, name, overrides)


def result(args, name: str) -> dict:
    summary = summary_of(args.artifacts, name)
    records = epoch_records(args.artifacts / name)
    return {"run": name, "last_val_acc": records[-1]["val_acc"], "best_val_acc": summary["best_val_acc"],
            "val_acc": [r["val_acc"] for r in records], "fidelity": records[-1].get("train_agreement"),
            "fidelity_by_epoch": [r.get("train_agreement") for r in records],
            # the median: an epoch slowed by other work on the machine does not move it
            "epoch_seconds": statistics.median(r["seconds"] for r in records),
            "teacher_forward": (summary.get("teacher") or {}).get("forward"),
            "fill": summary.get("teacher_views_fill"), "wall_seconds": run_wall_seconds(args.artifacts / name, records)}


def _spread(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * (max(values) - min(values)) / 2:.{digits}f}"


def table(args, teacher_acc: float | None, results: dict[tuple[str, str], list[dict]],
          schedules: list[Schedule]) -> str:
    teacher = f"{100 * teacher_acc:.2f}%" if teacher_acc is not None else "?"
    lines = [f"full seg_train at {args.data}, val = 10% held out (split_seed 0); teacher {teacher} (its best.pt), "
             f"students 64 px, {args.precision}; accuracy %, mean ± half-range over seeds", "",
             "| schedule | row | seeds | val acc (last) | best val acc | gap closed | fidelity % (train views) | "
             "cost per epoch × no KD | wall time |", "|---|---|---|---|---|---|---|---|---|"]
    for schedule in schedules:
        floor = results.get((schedule.key, "nokd"))
        for row in ROWS:
            runs = results.get((schedule.key, row.key))
            if not runs:
                continue
            last = statistics.mean(r["last_val_acc"] for r in runs)
            gap = "–"
            if row.key != "nokd" and floor and teacher_acc is not None:
                base = statistics.mean(r["last_val_acc"] for r in floor)
                gap = f"{(last - base) / (teacher_acc - base):.0%}" if teacher_acc > base else "(no gap)"
            fidelity = [r["fidelity"] for r in runs if r["fidelity"] is not None]
            cost = "–"
            if floor:
                per_epoch = statistics.mean(r["epoch_seconds"] for r in runs)
                cost = f"{per_epoch / statistics.mean(r['epoch_seconds'] for r in floor):.2f}"
            walls = " + ".join(f"{r['wall_seconds'] / 60:.1f}" for r in runs)
            forward = runs[0]["teacher_forward"]
            label = row.label + (f" ({forward})" if forward else "")
            lines.append(f"| {schedule.epochs} ep, {schedule.student}-block | {label} | {len(runs)} | "
                         f"{_spread([r['last_val_acc'] for r in runs])} | "
                         f"{_spread([r['best_val_acc'] for r in runs])} | {gap} | "
                         f"{_spread(fidelity) if fidelity else '–'} | {cost} | "
                         f"{walls} min |")
    return "\n".join(lines)


def plot_curves(args, results: dict, schedule: Schedule, teacher_acc: float | None) -> Path | None:
    """Val accuracy and fidelity on training views against epochs for one schedule's rows, every seed
    (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, fid_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, row in enumerate(ROWS):
        for run in results.get((schedule.key, row.key), []):
            seed = run["run"].rsplit("_s", 1)[-1]
            style = dict(color=f"C{index}", linestyle="-" if seed == "0" else ":", label=f"{row.label}, seed {seed}")
            epochs = range(1, len(run["val_acc"]) + 1)
            acc_ax.plot(epochs, [100 * a for a in run["val_acc"]], **style)
            fidelity = run.get("fidelity_by_epoch") or []
            if any(f is not None for f in fidelity):
                fid_ax.plot(epochs, [100 * f if f is not None else None for f in fidelity], **style)
    if not acc_ax.lines:
        plt.close(fig)
        return None
    if teacher_acc is not None:
        acc_ax.axhline(100 * teacher_acc, color="gray", linestyle="--", label="teacher")
    acc_ax.set_ylim(bottom=max(60, acc_ax.get_ylim()[0]))
    acc_ax.set(xlabel="epoch", ylabel="val accuracy %")
    fid_ax.set(xlabel="epoch", ylabel="top-1 agreement with the teacher, training views %")
    acc_ax.set_title(f"{schedule.student}-block student at 64 px, {schedule.epochs} epochs: val accuracy", fontsize=10)
    fid_ax.set_title("fidelity on the views it trained on (mixed ones for function matching)", fontsize=10)
    for ax in (acc_ax, fid_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    path = args.artifacts / f"function_matching_{schedule.key}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the assembled Intel folder (assemble.sh DEST)")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--teacher", help="the fine-tuned teacher's best.pt (default: train teacher_s0 here)")
    parser.add_argument("--epochs", type=int, default=30, help="the standard schedule")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the standard schedule's seeds")
    parser.add_argument("--long", action="store_true", help="also the long schedule (1 seed)")
    parser.add_argument("--long-only", action="store_true",
                        help="the long schedule alone (its rows in a session of their own; implies --long)")
    parser.add_argument("--long-epochs", type=int, default=100)
    parser.add_argument("--long-student", type=int, choices=(8, 4), default=8, help="blocks of the long rows")
    parser.add_argument("--precision", default="bf16", help="students' precision (fp32 on CPUs without bf16)")
    parser.add_argument("--only", nargs="*", help="row keys to run (nokd kd_views kd_live fm; default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every student row (a quick check: data.max_per_class=20)")
    parser.add_argument("--table-only", action="store_true", help="run nothing; print the finished runs")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    args.artifacts = args.artifacts.resolve()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    schedules = [] if args.long_only else [Schedule(f"e{args.epochs}", args.epochs, tuple(args.seeds), 8)]
    if args.long or args.long_only:
        schedules.append(Schedule(f"long{args.long_epochs}", args.long_epochs, (0,), args.long_student))
    teacher = Path(args.teacher) if args.table_only and args.teacher else (
        args.artifacts / "teacher_s0" / "best.pt" if args.table_only else teacher_checkpoint(args))
    teacher_acc = None
    if teacher.is_file():
        import torch

        teacher_acc = torch.load(teacher, map_location="cpu", weights_only=False).get("val_acc")
    results: dict[tuple[str, str], list[dict]] = {}
    # seed 0 of every row first (no KD before the rows it is the baseline of): an interrupted benchmark
    # still has one whole column
    order = [(s, row, seed) for s in schedules for seed in s.seeds for row in ROWS]
    for schedule, row, seed in order:
        if args.only and row.key not in args.only:
            continue
        name = run_name(schedule, row, seed)
        if args.table_only:
            summary = summary_of(args.artifacts, name)
            if not summary or summary["status"] not in DONE:
                continue
        else:
            run_one(args, teacher, schedule, row, seed)
        results.setdefault((schedule.key, row.key), []).append(result(args, name))
        print(table(args, teacher_acc, results, schedules), file=sys.stderr, flush=True)
    text = table(args, teacher_acc, results, schedules)
    print(text)
    for schedule in schedules:
        png = plot_curves(args, results, schedule, teacher_acc)
        if png:
            print(f"\n![val accuracy against epochs, {schedule.key}]({png.name})")
    (args.artifacts / "function_matching.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "teacher_val_acc": teacher_acc,
         "results": {f"{s}/{r}": runs for (s, r), runs in results.items()}, "table": text}, indent=1))


if __name__ == "__main__":
    main()
