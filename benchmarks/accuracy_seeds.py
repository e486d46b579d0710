"""Paper recipe vs improved recipe, and what distillation itself buys: validation accuracy over seeds.

Rows (every one with the same epoch cap, image size, precision and data; see ROWS below):
  teacher  paper        edgekd train   recipes/intel_teacher.yaml
  teacher  plus         edgekd train   recipes/intel_teacher_plus.yaml
  8-block  paper kd     edgekd distill recipes/intel_8block.yaml       (from the paper teacher, seed 0)
  8-block  plus no-KD   edgekd train   recipes/intel_8block_plus.yaml  (cross-entropy only)
  8-block  plus kd / dkd / dist        edgekd distill recipes/intel_8block_plus.yaml --set distill.method=M
           every seed learns from seed 0 of the 12-block plus teacher
  --extras: other teachers at the same budget (born-again, ensembles of the no-KD students; EXTRA_ROWS)

    python benchmarks/accuracy_seeds.py --data ../shared/datasets/intel-sample --image-size 64 \\
        --epochs 12 --seeds 0 1 2 --precision bf16 --artifacts /tmp/accuracy/artifacts

Each run is an `edgekd` subprocess; a run whose summary says finished or early_stopped is not run again,
so an interrupted table continues where it stopped. Prints a markdown table of mean ± std (population
std over the seeds) and writes it with every run's numbers to <artifacts>/accuracy_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from timed_run import summary_of  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent
DONE = {"finished", "early_stopped"}


@dataclass
class Row:
    label: str
    command: str  # train or distill
    recipe: str
    prefix: str  # run name = <prefix>_s<seed>
    teacher: str | None = None  # the row whose seed-0 run is the teacher
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None  # only these seeds (None: all)
    ensemble: bool = False  # the teacher is every seed's run of the teacher row, averaged


def _teacher_overrides(row: Row, artifacts: Path, seeds: list[int]) -> list[str]:
    if not row.teacher:
        return []
    # every seed of a student learns from the same teacher: seed 0 of its row (or all its seeds)
    first, *others = seeds if row.ensemble else seeds[:1]
    ensemble = ", ".join(str(artifacts / f"{row.teacher}_s{seed}" / "best.pt") for seed in others)
    return [f"teacher.checkpoint={artifacts / f'{row.teacher}_s{first}' / 'best.pt'}",
            *([f"teacher.ensemble=[{ensemble}]"] if others else [])]


def _plus_kd_rows(teacher: str, prefix: str, label: str, seeds=None, ensemble=False,
                  methods=("kd", "dkd", "dist")) -> list[Row]:
    return [Row(f"8-block · plus recipe, {method} {label}", "distill", "intel_8block_plus.yaml",
                f"{prefix}_{method}", teacher, (f"distill.method={method}",), seeds, ensemble)
            for method in methods]


ROWS = [
    Row("teacher · paper recipe", "train", "intel_teacher.yaml", "t_paper"),
    Row("teacher · plus recipe", "train", "intel_teacher_plus.yaml", "t_plus"),
    Row("8-block · paper recipe (kd from the paper teacher, T=1, α=1)", "distill", "intel_8block.yaml", "s_paper",
        "t_paper"),
    Row("8-block · plus recipe, no KD", "train", "intel_8block_plus.yaml", "s_plus_nokd"),
    *_plus_kd_rows("t_plus", "s_plus", "from the 12-block plus teacher"),
]

# Other teachers, run with --extras (the same epoch budget; seed 0 only where said).
EXTRA_ROWS = [
    # Born-again distillation (Furlanello et al., 2018): the teacher is the no-KD 8-block of seed 0.
    *_plus_kd_rows("s_plus_nokd", "s_plus_ba", "from the no-KD 8-block (born-again)", seeds=(0,),
                   methods=("kd", "dkd")),
    # Hinton et al.'s setting: an ensemble teacher, the no-KD 8-blocks of every seed (logits averaged).
    # Trained with label smoothing they may make a poorer teacher (Mueller et al., 2019: smoothing erases
    # the similarity between classes that distillation passes on), so this row runs for the first seed only...
    *_plus_kd_rows("s_plus_nokd", "s_plus_ens", "from the ensemble of the no-KD 8-blocks", seeds=(0,),
                   ensemble=True, methods=("kd",)),
    # ...and the teachers are the same 8-blocks trained without label smoothing.
    Row("8-block · plus recipe without label smoothing, no KD", "train", "intel_8block_plus.yaml",
        "s_plus_nols", overrides=("train.label_smoothing=0",)),
    *_plus_kd_rows("s_plus_nols", "s_plus_ens_nols", "from the ensemble of the no-KD 8-blocks without label "
                   "smoothing", ensemble=True, methods=("kd", "dkd")),
]


def run_one(args, artifacts: Path, row: Row, seed: int) -> dict:
    name = f"{row.prefix}_s{seed}"
    summary = summary_of(artifacts, name)
    if summary and summary["status"] in DONE:
        return summary
    overrides = [f"name={name}", f"data.root={args.data}", f"data.image_size={args.image_size}",
                 f"train.epochs={args.epochs}", f"train.seed={seed}", f"precision={args.precision}", *row.overrides]
    overrides += _teacher_overrides(row, artifacts, args.seeds)
    cmd = [sys.executable, "-m", "edgekd", "-q", row.command, str(REPO / "recipes" / row.recipe),
           "--artifacts", str(artifacts)]
    if summary and (artifacts / name / "last.pt").is_file():  # an interrupted run continues
        cmd.append("--resume")
    elif summary:  # interrupted before its first epoch ended: nothing to keep
        shutil.rmtree(artifacts / name)
    for item in overrides:
        cmd += ["--set", item]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return summary_of(artifacts, name)


def epoch_records(artifacts: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (artifacts / name / "metrics.jsonl").read_text().splitlines()]


def median_epoch_seconds(records: list[dict]) -> float:
    # the median, not the mean: one epoch stretched by another job on the same cores says nothing of the run
    return statistics.median(record["seconds"] for record in records)


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:  # one seed has no spread to show
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.pstdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--extras", action="store_true", help="also the other teachers (born-again, ensembles)")
    parser.add_argument("--only", nargs="*", help="name prefixes of the rows to run (default: all)")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print the table of the runs that have finished")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    rows = [row for row in ROWS + EXTRA_ROWS * args.extras if not args.only or row.prefix in args.only]
    results: dict[str, list[dict]] = {row.prefix: [] for row in rows}
    # The no-KD students first (an ensemble teacher needs every seed of them), then ensemble-taught
    # students, then everything else seed by seed.
    first = [row for row in rows if any(other.ensemble and other.teacher == row.prefix for other in rows)]
    order = [(row, seed) for row in first for seed in args.seeds]
    order += [(row, seed) for row in rows if row.ensemble for seed in args.seeds]
    order += [(row, seed) for seed in args.seeds for row in rows if row not in first and not row.ensemble]
    for row, seed in order:
        if row.seeds is not None and seed not in row.seeds:
            continue
        if args.table_only:
            summary = summary_of(args.artifacts, f"{row.prefix}_s{seed}")
            if not summary or summary["status"] not in DONE:
                continue
        else:
            summary = run_one(args, args.artifacts, row, seed)
        records = epoch_records(args.artifacts, summary["run"])
        results[row.prefix].append({"seed": seed, "best_val_acc": summary["best_val_acc"],
                                    "last_val_acc": records[-1]["val_acc"],
                                    "epochs": summary["epochs_done"], "best_epoch": summary["best_epoch"],
                                    "seconds_per_epoch": median_epoch_seconds(records),
                                    "precision": summary["precision"], "loss": summary["loss"],
                                    "teacher": summary["teacher"]})
    print(f"\nintel-style data {args.data}, {args.image_size}px, epoch cap {args.epochs}, "
          f"precision {args.precision}; val accuracy %, mean ± std over the seeds run\n")
    print("| row | seeds | best val acc | last-epoch val acc | epochs run | median s/epoch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        runs = results[row.prefix]
        if not runs:
            continue
        print(f"| {row.label} | {len(runs)} | {mean_std([r['best_val_acc'] for r in runs])} | "
              f"{mean_std([r['last_val_acc'] for r in runs])} | "
              f"{statistics.mean(r['epochs'] for r in runs):.1f} | "
              f"{statistics.mean(r['seconds_per_epoch'] for r in runs):.1f} |")
    (args.artifacts / "accuracy_seeds.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
