"""Distillation speed: edgekd against a plain PyTorch loop, side by side in one run.

  plain loop   torchvision ImageFolder decoding and resizing every JPEG every epoch, the teacher run on
               every batch, fp32 (what seeds 000 and 001 do)
  edgekd fp32  decode-once cache, teacher logits computed once, fp32
  edgekd bf16  the same with bf16 autocast (native on CPUs with AVX-512 BF16 / AMX)

Same data, teacher, student architecture, batch size, optimizer and epochs for every row, and every row
validates after each epoch. Prints seconds per epoch after the first (the first pays one-off costs:
cache building, teacher logits), the last and best validation accuracy, and the ratios against the
plain loop.

    python benchmarks/distill_speed.py --recipe recipes/intel_8block.yaml \\
        --teacher artifacts/intel_teacher/best.pt --data ../shared/datasets/intel-sample --image-size 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(recipe, teacher_path: Path, data: Path, epochs: int) -> dict:
    """The reference: a textbook distillation loop with torchvision's ImageFolder and DataLoader."""
    from torchvision import datasets, transforms

    from edgekd.models import Classifier, create_model
    from edgekd.train.checkpoint import load_model
    from edgekd.train.losses import kd_loss

    torch.manual_seed(recipe.train.seed)
    teacher, meta = load_model(teacher_path)
    size = recipe.data.image_size
    to_pixels = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    train = datasets.ImageFolder(str(data / "train"), transform=to_pixels)
    val = datasets.ImageFolder(str(data / "val"), transform=to_pixels)
    loader = torch.utils.data.DataLoader(train, batch_size=recipe.train.batch_size, shuffle=True, drop_last=True)
    student = Classifier(create_model(recipe.model.name, len(train.classes), **recipe.model.args),
                         tuple(meta["mean"]), tuple(meta["std"]))
    optimizer = torch.optim.Adam(student.parameters(), lr=recipe.train.lr)
    seconds, accuracies = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        student.train()
        for pixels, labels in loader:
            with torch.no_grad():
                teacher_logits = teacher(pixels)
            loss = kd_loss(student(pixels), teacher_logits, labels, recipe.distill.temperature, recipe.distill.alpha)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        student.eval()  # validate every epoch, as both seeds do (curves, early stopping)
        correct = 0
        with torch.no_grad():
            for pixels, labels in torch.utils.data.DataLoader(val, batch_size=recipe.train.batch_size):
                correct += int((student(pixels).argmax(1) == labels).sum())
        accuracies.append(correct / len(val))
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "val_acc": accuracies}


def edgekd_run(recipe_path: Path, overrides: list[str], precision: str, artifacts: Path) -> dict:
    from edgekd.recipe import load_recipe
    from edgekd.train.trainer import run

    summary = run(load_recipe(recipe_path, [*overrides, f"precision={precision}", f"name=bench_{precision}"]),
                  "distill", artifacts)
    records = [json.loads(line) for line in (artifacts / summary["run"] / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": [r["seconds"] for r in records], "val_acc": [r["val_acc"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a student recipe (model, batch, optimizer, KD loss)")
    parser.add_argument("--teacher", required=True, help="the teacher checkpoint (best.pt)")
    parser.add_argument("--data", required=True, help="an ImageFolder root with train/ and val/")
    parser.add_argument("--image-size", type=int, required=True, help="must match the teacher's")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from edgekd.recipe import load_recipe

    overrides = [f"data.root={args.data}", f"data.image_size={args.image_size}", f"train.epochs={args.epochs}",
                 f"teacher.checkpoint={args.teacher}", "train.patience=null"]
    recipe = load_recipe(args.recipe, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"plain loop (fp32)": plain_loop(recipe, Path(args.teacher), Path(args.data), args.epochs),
                "edgekd fp32": edgekd_run(Path(args.recipe), overrides, "fp32", Path(tmp)),
                "edgekd bf16": edgekd_run(Path(args.recipe), overrides, "bf16", Path(tmp))}
    print(f"\n{recipe.model.name} {recipe.model.args} student, batch {recipe.train.batch_size}, {args.image_size}px, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads\n")
    print(f"{'':20} {'first epoch s':>14} {'later epochs s':>15} {'last val acc':>13} {'best val acc':>13} "
          f"{'speed-up':>9}")
    reference = statistics.mean(rows["plain loop (fp32)"]["seconds"][1:])
    for name, row in rows.items():
        later = statistics.mean(row["seconds"][1:])
        print(f"{name:20} {row['seconds'][0]:>14.1f} {later:>15.1f} {row['val_acc'][-1]:>13.2%} "
              f"{max(row['val_acc']):>13.2%} {reference / later:>8.2f}x")
    print("\nseconds include each epoch's validation pass for every row")


if __name__ == "__main__":
    main()
