"""Kill a training run at random moments, resume it, and check nothing was lost but the last seconds.

For each of --kills moments drawn uniformly over an uninterrupted run's wall time, a fresh copy of the run
is started, SIGKILLed at that moment and continued with `edgekd train --resume` until it finishes. Printed
per kill: where the kill landed, the seconds of work lost (from the last saved state, or from the moment the
run claimed its folder when nothing was saved yet, to the kill) and whether the finished run equals the
uninterrupted one (every weight of last.pt and best.pt bit for bit, every metric but timing). Then the cost
of mid-epoch saving: epoch time with saves every --checkpoint-seconds against none, side by side, and the
seconds the saves themselves took (the runs' summaries count them).

    python benchmarks/kill_resume.py                      # 8-block student, 1200 Intel photos, 3 epochs
    python benchmarks/kill_resume.py --kills 5 --checkpoint-seconds 60 --data DEST   # DEST: assemble.sh's

The default interval is scaled to the short benchmark run (a few seconds, so most kills land after
mid-epoch saves); a real run uses train.checkpoint_seconds (60 by default) the same way.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TIMING = {"seconds", "train_seconds", "images_per_s"}


CHILDREN: list[subprocess.Popen] = []


@atexit.register
def _stop_children() -> None:
    """A benchmark stopped midway leaves no training process behind."""
    for child in CHILDREN:
        if child.poll() is None:
            child.kill()


def start(args, work: Path, name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EDGEKD_ARTIFACTS": str(work / name), "EDGEKD_CACHE": str(work / "cache")}
    overrides = [f"data.root={args.data}", f"train.epochs={args.epochs}", "name=run", *args.set]
    cmd = [sys.executable, "-m", "edgekd", "-q", "train", str(args.recipe), *extra]
    for item in overrides:
        cmd += ["--set", item]
    CHILDREN.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return CHILDREN[-1]


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a run failed:\n{err}")


def timed_run(args, work: Path, name: str, *extra: str) -> float:
    begin = time.monotonic()
    finish(start(args, work, name, *extra))
    return time.monotonic() - begin


def same_run(a: Path, b: Path) -> bool:
    for file in ("last.pt", "best.pt"):
        wa = torch.load(a / file, weights_only=True)["state_dict"]
        wb = torch.load(b / file, weights_only=True)["state_dict"]
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return metrics(a) == metrics(b)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def kill_once(args, work: Path, name: str, moment: float) -> dict:
    """Start, SIGKILL at `moment` seconds after the start, resume to the end; what was lost and kept."""
    run_dir = work / name / "run"
    process = start(args, work, name, "--set", f"train.checkpoint_seconds={args.checkpoint_seconds}")
    begin = time.monotonic()
    claimed = None  # when the run claimed its folder (summary.json appeared): its work starts there
    while time.monotonic() - begin < moment and process.poll() is None:
        if claimed is None and (run_dir / "summary.json").is_file():
            claimed = time.time()
        time.sleep(0.01)
    if process.poll() is not None:  # the machine got faster than the reference run: try an earlier moment
        finish(process)
        return {"moment": moment, "finished_after": time.monotonic() - begin}
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = time.time()
    where, lost = landing(run_dir, claimed, killed)
    finish(start(args, work, name, "--resume", "--set", f"train.checkpoint_seconds={args.checkpoint_seconds}"))
    return {"moment": moment, "where": where, "lost": lost, "match": same_run(work / "reference" / "run", run_dir)}


def landing(run_dir: Path, claimed: float | None, killed: float) -> tuple[str, float]:
    last = run_dir / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=True)
        progress, epoch = state["train_state"].get("epoch_progress"), state["epoch"]
        saved = f"epoch {progress['epoch']} batch {progress['next_batch']}" if progress else f"end of epoch {epoch}"
        return f"after a save at {saved}", killed - last.stat().st_mtime
    if claimed is not None:
        return "before the first save", killed - claimed
    return "before the run folder existed (start-up)", 0.0


def saving_cost(args, work: Path) -> dict:
    """Epoch time with and without mid-epoch saves, interleaved, and the saves' own seconds."""
    times: dict[str, list[float]] = {"none": [], "every": []}
    spent, per_save = [], []
    for repeat in range(args.cost_repeats):
        for label, value in (("none", "null"), ("every", str(args.checkpoint_seconds))):
            name = f"cost_{label}_{repeat}"
            finish(start(args, work, name, "--set", f"train.checkpoint_seconds={value}"))
            lines = [json.loads(x) for x in (work / name / "run" / "metrics.jsonl").read_text().splitlines()]
            times[label].append(sum(r["train_seconds"] for r in lines))
            if label == "every":
                summary = json.loads((work / name / "run" / "summary.json").read_text())
                spent.append(summary["checkpointing"]["seconds"] / times[label][-1])
                per_save.append(summary["checkpointing"]["seconds"] / max(1, summary["checkpointing"]["mid_epoch_saves"]))
    return {"none": statistics.median(times["none"]), "every": statistics.median(times["every"]),
            "saves_share": statistics.median(spent), "per_save": statistics.median(per_save)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "intel_8block_lite0.yaml",
                        help="trained with `edgekd train` (no teacher)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "intel-sample"))
    parser.add_argument("--set", action="append", default=["augment.render_size=null", "data.max_per_class=200"],
                        help="extra recipe overrides (default: views at the model's own size and 200 photos "
                             "per class, so 20 kills and their resumes take minutes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--checkpoint-seconds", type=float, default=1.0)
    parser.add_argument("--cost-repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # so atexit stops the children
    args.data = str(Path(args.data).resolve())
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    print(f"runs under {work}; {sys.executable} with {torch.get_num_threads()} threads", file=sys.stderr)
    timed_run(args, work, "warm")  # decodes the cache once, so no timed run pays for it
    wall = timed_run(args, work, "reference", "--set", f"train.checkpoint_seconds={args.checkpoint_seconds}")
    step = step_seconds(work / "reference" / "run")
    rng = random.Random(args.seed)
    rows = []
    while len(rows) < args.kills:
        k = len(rows)
        row = kill_once(args, work, f"kill{k:02d}", rng.uniform(0, wall))
        shutil.rmtree(work / f"kill{k:02d}")
        if "finished_after" in row:
            wall = row["finished_after"]  # draw the moments within what a run takes now
            continue
        rows.append(row)
        print(f"kill {k + 1:2d}/{args.kills} at {row['moment']:6.1f} s: {row['where']}; lost {row['lost']:.2f} s; "
              f"{'same' if row.get('match', True) else 'DIFFERENT'}", file=sys.stderr, flush=True)
    cost = saving_cost(args, work)
    print(table(args, wall, rows, cost, step))


def step_seconds(run_dir: Path) -> float:
    """The reference run's mean training step: a save can only come between steps."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batches = summary["dataset"]["sizes"]["train"] // 64 * len(lines)
    return sum(r["train_seconds"] for r in lines) / batches


def table(args, wall: float, rows: list[dict], cost: dict, step: float) -> str:
    resumed = [r for r in rows if "match" in r]
    lines = [f"{args.recipe.name} trained {args.epochs} epochs on {args.data}; mid-epoch saves every "
             f"{args.checkpoint_seconds:g} s; uninterrupted run {wall:.1f} s", "",
             "| kill | at s | landed | work lost s | resumed run equals the uninterrupted one |", "|---|---|---|---|---|"]
    for k, row in enumerate(rows, 1):
        match = "–" if "match" not in row else ("yes" if row["match"] else "**NO**")
        lines.append(f"| {k} | {row['moment']:.1f} | {row['where']} | {row['lost']:.2f} | {match} |")
    lines += ["", f"matching: {sum(r['match'] for r in resumed)}/{len(resumed)} resumed runs; most work lost "
              f"{max(r['lost'] for r in rows):.2f} s (interval {args.checkpoint_seconds:g} s; a save comes between "
              f"training steps, {step:.2f} s each here)",
              f"training seconds for {args.epochs} epochs, median of {args.cost_repeats}: no mid-epoch saves "
              f"{cost['none']:.2f}, saves every {args.checkpoint_seconds:g} s {cost['every']:.2f} "
              f"(ratio {cost['every'] / cost['none']:.3f}); the saves themselves: "
              f"{100 * cost['saves_share']:.2f}% of training time, {cost['per_save']:.3f} s per save, so "
              f"{100 * cost['per_save'] / 60:.2f}% at the default interval of 60 s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
