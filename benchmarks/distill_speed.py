"""What distillation costs over training the student alone: teacher views against a teacher on every batch.

One command, resumable (finished rows are kept; an interrupted edgekd row continues from its newest state):

    python benchmarks/distill_speed.py --data DEST --teacher RUN/best.pt --artifacts /path/to/runs

DEST is what ../shared/datasets/intel-image-classification/assemble.sh DEST lays out (Kaggle's whole
seg_train); val is the recipes' 10% hold-out (split_seed 0). The teacher is a fine-tuned pretrained
checkpoint at its own resolution (150 px: recipes/intel_lite0_teacher.yaml); the student is
recipes/intel_8block_lite0.yaml at 64 px. Same student, epochs, batch, optimizer and split in every row:

  plain loop     torchvision ImageFolder + DataLoader decoding every JPEG every epoch, the same random
                 crop/flip/colour jitter at 150 px, the teacher (PyTorch fp32) on every batch, the student
                 on that batch resized to 64 px, fp32 (what seeds 000 and 001 do)
  per-batch      edgekd distill with the PyTorch teacher on every batch (distill.teacher_views: null,
                 distill.teacher_forward: torch)
  live           edgekd distill with the teacher on every batch on its fastest forward here (measured once
                 before the loop, as the fill's: OpenVINO bf16, onnxruntime, PyTorch; the table names it)
  views K        edgekd distill with K stored teacher views per photo (K = 2, 4, 8); the fill runs once
                 per K and is shared by the seeds (it is keyed by the views' seed, not the student's)
  no teacher     edgekd train: the floor, training the student alone

Every row's cost is its wall time, process start and data loading included; a views row's first seed
pays the fill, which the table shows apart and adds back ("fill included"). The 30-epoch column projects
from the measured fill, per-epoch and start-up times. Ratios are to the no-teacher row (the floor) and to
the plain loop. Writes <artifacts>/distill_speed.json with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from timed_run import run_timed, wall_seconds_file  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "intel_8block_lite0.yaml"
DONE = {"finished", "early_stopped"}
ROWS = {  # key: (label, edgekd command, overrides)
    "plain": ("plain loop: ImageFolder + DataLoader, teacher every batch, fp32", None, ()),
    "per_batch": ("edgekd, teacher on every batch, PyTorch", "distill",
                  ("distill.teacher_views=null", "distill.teacher_forward=torch")),
    "live": ("edgekd, live teacher on its fastest forward", "distill", ("distill.teacher_views=null",)),
    "views2": ("edgekd, teacher views K=2", "distill", ("distill.teacher_views=2",)),
    "views4": ("edgekd, teacher views K=4", "distill", ("distill.teacher_views=4",)),
    "views8": ("edgekd, teacher views K=8", "distill", ("distill.teacher_views=8",)),
    "no_teacher": ("edgekd, no teacher (the floor)", "train", ()),
}
# seed 0 of every row first, so an interrupted benchmark still has one full column of rows
ORDER = [("no_teacher", 0), ("live", 0), ("views4", 0), ("views2", 0), ("views8", 0), ("per_batch", 0), ("plain", 0),
         ("no_teacher", 1), ("live", 1), ("views4", 1), ("views2", 1), ("per_batch", 1), ("views8", 1)]


def _state(artifacts: Path) -> dict:
    """The benchmark's own state: the views' seed is drawn once, so a resumed benchmark reuses its fills
    while a new one (another artifacts folder) measures fresh fills rather than reading an old cache."""
    path = artifacts / "distill_speed_state.json"
    if not path.is_file():
        artifacts.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"views_seed": random.randrange(1_000, 1_000_000), "plain": {}}))
    return json.loads(path.read_text())


def _save_state(artifacts: Path, state: dict) -> None:
    (artifacts / "distill_speed_state.json").write_text(json.dumps(state, indent=1))


def edgekd_row(args, state: dict, key: str, seed: int) -> dict:
    name = f"{key}_s{seed}"
    folder = args.artifacts / name
    summary_path, wall_path = folder / "summary.json", wall_seconds_file(folder)
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if not summary or summary["status"] not in DONE:
        _, command, extra = ROWS[key]
        overrides = [f"name={name}", f"data.root={args.data}", f"train.seed={seed}", f"train.epochs={args.epochs}",
                     f"precision={args.precision}", *extra, *args.overrides]
        if command == "distill":
            overrides += [f"teacher.checkpoint={args.teacher}", f"distill.teacher_views_seed={state['views_seed']}"]
        cmd = [sys.executable, "-m", "edgekd", "-q", command, str(RECIPE), "--artifacts", str(args.artifacts),
               "--resume"]
        for item in overrides:
            cmd += ["--set", item]
        run_timed(cmd, folder, name)
        summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    fill = summary.get("teacher_views_fill") or {}
    return {"wall_seconds": json.loads(wall_path.read_text())["seconds"],
            "epoch_seconds": [r["seconds"] for r in records], "last_val_acc": records[-1]["val_acc"],
            "best_val_acc": max(r["val_acc"] for r in records), "fill_seconds": fill.get("seconds"),
            "fill_views": fill.get("views"), "fill_forward": fill.get("forward"),
            "teacher_forward": (summary.get("teacher") or {}).get("forward")}


def plain_loop(args, seed: int) -> dict:
    """The reference: a textbook distillation loop, on edgekd's own train/val split of the same files."""
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    from edgekd.data.dataset import stratified_holdout
    from edgekd.data.sources import folder_class_names, folder_split
    from edgekd.models import Classifier, create_model
    from edgekd.recipe import load_recipe
    from edgekd.train.checkpoint import load_model
    from edgekd.train.losses import kd_loss

    started = time.time()
    recipe = load_recipe(RECIPE, [f"data.root={args.data}"])
    torch.manual_seed(seed)
    root = Path(args.data) / "seg_train" / "seg_train"
    listed = folder_split(root, "train", folder_class_names(root))
    _, held = stratified_holdout(listed.labels, recipe.data.val_fraction, recipe.data.split_seed)
    val_paths = {str(listed.paths[i]) for i in held}
    teacher, meta = load_model(Path(args.teacher))
    teacher.eval()
    size, jitter = meta["image_size"], recipe.augment.color_jitter
    augment = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(recipe.augment.crop_scale, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(jitter, jitter, jitter), transforms.PILToTensor()])
    plain = transforms.Compose([transforms.Resize((recipe.data.image_size, recipe.data.image_size)),
                                transforms.PILToTensor()])
    train_set = datasets.ImageFolder(str(root), transform=augment)
    val_set = datasets.ImageFolder(str(root), transform=plain)
    train_idx = [i for i, (path, _) in enumerate(train_set.samples) if path not in val_paths]
    val_idx = [i for i, (path, _) in enumerate(val_set.samples) if path in val_paths]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_set, train_idx), num_workers=2,
                                         batch_size=recipe.train.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, val_idx), num_workers=2,
                                             batch_size=256)
    student = Classifier(create_model(recipe.model.name, len(train_set.classes), **recipe.model.args),
                         tuple(meta["mean"]), tuple(meta["std"]))
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    epoch_seconds, accuracies = [], []
    for _ in range(args.epochs):
        start = time.time()
        student.train()
        for pixels, labels in loader:
            pixels = pixels.float()
            with torch.no_grad():
                teacher_logits = teacher(pixels)
            small = F.interpolate(pixels, size=recipe.data.image_size, mode="bilinear", antialias=True)
            loss = kd_loss(student(small), teacher_logits, labels, recipe.distill.temperature, recipe.distill.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        student.eval()  # validate every epoch, as both seeds do
        correct = 0
        with torch.no_grad():
            for pixels, labels in val_loader:
                correct += int((student(pixels.float()).argmax(1) == labels).sum())
        accuracies.append(correct / len(val_idx))
        epoch_seconds.append(time.time() - start)
        print(f"[{time.strftime('%H:%M:%S')}] plain loop epoch {len(accuracies)}: {epoch_seconds[-1]:.0f} s, "
              f"val {accuracies[-1]:.2%}", file=sys.stderr, flush=True)
    return {"wall_seconds": time.time() - started, "epoch_seconds": epoch_seconds, "last_val_acc": accuracies[-1],
            "best_val_acc": max(accuracies), "fill_seconds": None, "fill_views": None, "fill_forward": None}


def _row_costs(runs: list[dict], projected_epochs: int) -> dict:
    """Seconds of a run with the fill included (the first seed's fill, paid once per K), and projected."""
    fills = [r["fill_seconds"] for r in runs if r["fill_seconds"]]
    fill = fills[0] if fills else 0.0
    walls = [r["wall_seconds"] + (fill if not r["fill_seconds"] else 0.0) for r in runs]
    per_epoch = statistics.mean(s for r in runs for s in r["epoch_seconds"])
    start_up = statistics.mean(r["wall_seconds"] - (r["fill_seconds"] or 0.0) - sum(r["epoch_seconds"]) for r in runs)
    return {"fill": fill, "wall": statistics.mean(walls), "per_epoch": per_epoch,
            "projected": fill + start_up + projected_epochs * per_epoch}


def _accuracy(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * (max(values) - min(values)) / 2:.2f}"


def table(args, results: dict[str, list[dict]]) -> str:
    costs = {key: _row_costs(runs, args.project) for key, runs in results.items()}
    floor, plain = costs.get("no_teacher"), costs.get("plain")
    lines = [f"{args.epochs} epochs, 8-block student at 64 px ({args.precision}), teacher {args.teacher} at 150 px, "
             f"full seg_train (val: 10% held out); accuracy: last epoch, mean ± half-range over seeds",
             "", f"| row | seeds | fill s | s per epoch | {args.epochs}-epoch run s (fill included) | "
             f"× no teacher | × plain loop | s per epoch × no teacher | {args.project}-epoch projection s "
             "(× no teacher) | val acc % | best val acc % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ROWS:
        if key not in results:
            continue
        runs, cost = results[key], costs[key]
        versus_floor = f"{cost['wall'] / floor['wall']:.2f}" if floor else "–"
        versus_plain = f"{cost['wall'] / plain['wall']:.2f}" if plain else "–"
        projection = f"{cost['projected']:.0f}" + (f" ({cost['projected'] / floor['projected']:.2f})" if floor else "")
        fill = f"{cost['fill']:.0f} ({runs[0]['fill_forward']})" if cost["fill"] else "–"
        if runs[0].get("teacher_forward"):  # the live teacher's forward pass, in place of a fill
            fill = f"– (live: {runs[0]['teacher_forward']})"
        per_epoch = f"{cost['per_epoch'] / floor['per_epoch']:.2f}" if floor else "–"
        lines.append(f"| {ROWS[key][0]} | {len(runs)} | {fill} | {cost['per_epoch']:.1f} | {cost['wall']:.0f} | "
                     f"{versus_floor} | {versus_plain} | {per_epoch} | {projection} | "
                     f"{_accuracy([r['last_val_acc'] for r in runs])} | {_accuracy([r['best_val_acc'] for r in runs])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the assembled Intel folder (assemble.sh DEST)")
    parser.add_argument("--teacher", required=True, help="the fine-tuned teacher's best.pt (150 px)")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--project", type=int, default=30, help="the longer schedule the table projects to")
    parser.add_argument("--precision", default=None, help="students' precision (default: bf16 where native, "
                                                          "else fp32)")
    parser.add_argument("--only", nargs="*", help="row keys to run (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for every edgekd row (a quick check: data.max_per_class=20)")
    args = parser.parse_args()
    args.data, args.teacher = str(Path(args.data).resolve()), str(Path(args.teacher).resolve())
    args.artifacts = args.artifacts.resolve()
    if args.precision is None:
        from edgekd.train.precision import cpu_has_native_bf16
        args.precision = "bf16" if cpu_has_native_bf16() else "fp32"
    state = _state(args.artifacts)
    results: dict[str, list[dict]] = {}
    for key, seed in ORDER:
        if args.only and key not in args.only:
            continue
        if key == "plain":
            if str(seed) not in state["plain"]:
                state["plain"][str(seed)] = plain_loop(args, seed)
                _save_state(args.artifacts, state)
            result = state["plain"][str(seed)]
        else:
            result = edgekd_row(args, state, key, seed)
        results.setdefault(key, []).append(result)
        print(table(args, results), file=sys.stderr, flush=True)
    text = table(args, results)
    print(text)
    (args.artifacts / "distill_speed.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "state": state, "results": results, "table": text},
        indent=1))


if __name__ == "__main__":
    main()
