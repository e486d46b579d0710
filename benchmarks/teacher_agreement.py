"""How far can a teacher on this val split go? Teachers alone and averaged, and the photos they all get wrong.

    python benchmarks/teacher_agreement.py --data DEST --teachers RUN/best.pt ... [--students RUN/best.pt ...]

Every checkpoint is evaluated on its own recipe's held-out val split (the same photos for every recipe
with the same split_seed and val_fraction: checked), each at its own image size, in fp32. Prints:

- each model's val accuracy;
- every ensemble of two or more teachers (their softmax probabilities averaged);
- the val photos every teacher gets wrong, how many of them all teachers give the same other class (for
  this dataset these are mostly glacier/mountain and buildings/street photos whose label is disputable),
  and the commonest (label, teacher's class) pairs;
- for each student: its errors, how many fall on those photos, its accuracy on the others, and its top-1
  agreement with the first teacher on val (fidelity on unseen photos, as Stanton et al. 2021 measure it);
- with --through 64: each teacher shown the val photos at 64 px (downsampled, then resized back to its own
  size): what the teacher itself makes of a student's pixels, an estimate of how much of its lead a
  64 px student could learn at all.

A student learns its teacher's answers; where every teacher disagrees with the label, distillation cannot
be expected to win points, which bounds what it can add over a student trained alone.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekd.evaluate import predict
from edgekd.train.checkpoint import checkpoint_dataset, load_model


class Through(torch.nn.Module):
    """The model shown its input at `size` px: downsampled (antialiased), then resized back."""

    def __init__(self, model: torch.nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # normalisation is per-channel affine, so resizing the normalised pixels equals resizing the photo
        small = F.interpolate(pixels, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return self.model(F.interpolate(small, size=pixels.shape[-2:], mode="bilinear", align_corners=False))


def val_probabilities(path: Path, data: str | None, through: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Softmax probabilities and labels on the checkpoint's val split, the class names and the photos' ids."""
    model, payload = load_model(path, "cpu")
    if through:
        model = Through(model, through)
    _, dataset = checkpoint_dataset(payload, ("val",), data)
    split = dataset.splits["val"]
    entry = dataset.entries.get("val") or dataset.entries["train"]  # a held-out val lives in train's entry
    with torch.inference_mode():
        logits, labels = predict(model, split, 128, torch.device("cpu"))
    return logits.softmax(1), labels, payload["class_names"], [entry.ids[row] for row in split.rows]


def name_of(path: Path) -> str:
    return path.parent.name if path.suffix == ".pt" else path.name


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100 * float((probs.argmax(1) == labels).float().mean()), 2)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(100 * float((a.argmax(1) == b.argmax(1)).float().mean()), 2)


def analyse(teachers: dict, students: dict, labels: torch.Tensor, classes: list[str], probes: dict,
            through: int | None) -> dict:
    ensembles = {"+".join(group): accuracy(sum(teachers[n] for n in group) / len(group), labels)
                 for size in range(2, len(teachers) + 1) for group in itertools.combinations(teachers, size)}
    answers = torch.stack([p.argmax(1) for p in teachers.values()])
    all_wrong = (answers != labels).all(0)
    unanimous = all_wrong & (answers == answers[0]).all(0)
    pairs = collections.Counter((classes[int(y)], classes[int(a)])
                                for y, a in zip(labels[unanimous], answers[0][unanimous]))
    result = {"photos": len(labels), "accuracy": {n: accuracy(p, labels) for n, p in {**teachers, **students}.items()},
              "ensembles": ensembles, "all_teachers_wrong": int(all_wrong.sum()),
              "all_teachers_wrong_same_class": int(unanimous.sum()),
              "commonest": [[y, a, n] for (y, a), n in pairs.most_common(6)], "students": {},
              "through_px": through,
              "through": {n: {"accuracy": accuracy(p, labels), "agreement": agreement(p, teachers[n])}
                          for n, p in probes.items()}}
    first = next(iter(teachers.values()))
    for name, probs in students.items():
        wrong = probs.argmax(1) != labels
        result["students"][name] = {"errors": int(wrong.sum()), "on_all_teachers_wrong": int((wrong & all_wrong).sum()),
                                    "accuracy_elsewhere": round(100 * float(1 - wrong[~all_wrong].float().mean()), 2),
                                    "agreement_with_first_teacher": agreement(probs, first)}
    return result


def report(result: dict) -> str:
    lines = [f"val photos: {result['photos']}", "", "| model | val acc % |", "|---|---|"]
    lines += [f"| {n} | {a:.2f} |" for n, a in result["accuracy"].items()]
    lines += [f"| ensemble {n} | {a:.2f} |" for n, a in result["ensembles"].items()]
    share = 100 * result["all_teachers_wrong"] / result["photos"]
    lines += ["", f"every teacher wrong: {result['all_teachers_wrong']} photos ({share:.1f}%), "
              f"{result['all_teachers_wrong_same_class']} of them given the same other class by all",
              "commonest (label -> teachers' class): "
              + ", ".join(f"{y} -> {a} {n}" for y, a, n in result["commonest"])]
    for name, s in result["students"].items():
        lines.append(f"student {name}: {s['errors']} errors, {s['on_all_teachers_wrong']} of them on those photos; "
                     f"{s['accuracy_elsewhere']:.2f}% on the other photos; agrees with the first teacher on "
                     f"{s['agreement_with_first_teacher']:.2f}% of val")
    for name, t in result["through"].items():
        lines.append(f"teacher {name} through {result['through_px']} px: {t['accuracy']:.2f}% val acc, "
                     f"agrees with itself at full size on "
                     f"{t['agreement']:.2f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", type=Path, nargs="+", required=True, help="teacher checkpoints (best.pt)")
    parser.add_argument("--students", type=Path, nargs="*", default=[], help="student checkpoints to place")
    parser.add_argument("--data", help="the dataset root, if it moved since training")
    parser.add_argument("--out", type=Path, help="also write the result here as JSON")
    parser.add_argument("--through", type=int, help="also each teacher on val photos seen at this many px")
    args = parser.parse_args()
    if args.through is not None and args.through < 8:
        parser.error(f"--through {args.through}: give a size of at least 8 px (the student's, e.g. 64)")
    probs, labels, classes, photos = {}, None, None, None
    for path in [*args.teachers, *args.students]:
        probs[name_of(path)], labels, classes, these = val_probabilities(path, args.data)
        if photos is not None and these != photos:
            raise SystemExit(f"{path}: its val split holds other photos (another split_seed or val_fraction?)")
        photos = these
    teachers = {name_of(p): probs[name_of(p)] for p in args.teachers}
    students = {name_of(p): probs[name_of(p)] for p in args.students}
    probes = {name_of(p): val_probabilities(p, args.data, args.through)[0]
              for p in args.teachers} if args.through else {}
    result = analyse(teachers, students, labels, classes, probes, args.through)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
