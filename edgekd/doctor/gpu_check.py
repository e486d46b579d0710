"""The paper's setting, timed: `python -m edgekd.doctor.gpu_check` (scripts/gpu-check.sh runs it after the smoke).

Training throughput of the 8-block student at 150 px, batch 224 (Park & Kotla), with each precision's
policy (fp32, fp16, fp8; bf16 too on request) for a few hundred steps on the Intel sample, and a
teacher-view fill by the 12-block teacher with the fp16 forward on CUDA. The models start untrained:
speed is measured here, not accuracy. The training set is uploaded to the device once and batches are
drawn there, so images/s is the step itself (forward, loss, backward, optimizer), not data loading.
`--cpu` is the same code at toy step counts and 48 px, so the script can be tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    data: str
    out: Path
    device: str  # cuda | cpu
    precisions: list[str]
    steps: int
    warmup: int
    batch_size: int
    max_per_class: int | None  # None: every photo of the sample
    fill_photos_per_class: int | None
    fill_forward: str  # the teacher forward pass of the fill (teacher_forward.candidates' name)
    image_size: int | None = None  # None: the recipes' (150 px)


def settings(args: argparse.Namespace) -> Settings:
    if args.cpu:
        return Settings(args.data, Path(args.out), "cpu", args.precisions or ["fp32", "fp16", "fp8"], args.steps or 1,
                        1, args.batch_size or 8, 4, 2, "torch fp32 (CPU, channels-last)", image_size=48)
    return Settings(args.data, Path(args.out), "cuda", args.precisions or ["fp32", "fp16", "fp8"], args.steps or 300,
                    10, args.batch_size or 224, None, None, "torch fp16 autocast (CUDA)")


def _train_split(recipe_file: str, s: Settings, max_per_class: int | None):
    from edgekd.data import open_dataset
    from edgekd.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / recipe_file, [f"data.root={Path(s.data).resolve()}", "teacher.recipe=null"]
                         + ([f"data.max_per_class={max_per_class}"] if max_per_class else [])
                         + ([f"data.image_size={s.image_size}"] if s.image_size else []))
    return recipe, open_dataset(recipe.data, splits=("train",), workers=8).splits["train"]


def throughput(s: Settings, precision: str, recipe, split) -> dict:
    """Images per second of training steps of the recipe's model at `precision` (its policy, as the trainer uses it)."""
    import torch
    import torch.nn.functional as F

    from edgekd.models.classifier import Classifier
    from edgekd.models.registry import create_model
    from edgekd.train.precision import make_policy

    device = torch.device(s.device)
    torch.manual_seed(0)
    policy = make_policy(precision, device)
    net = create_model(recipe.model.name, int(split.labels.max()) + 1, **recipe.model.args)
    policy.prepare(net)
    model = Classifier(net, (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.train.lr)
    images = torch.from_numpy(split.images[split.rows]).to(device).permute(0, 3, 1, 2)
    labels = torch.from_numpy(split.labels[split.rows].astype("int64")).to(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    losses = []

    def step() -> None:
        index = torch.randint(0, len(images), (s.batch_size,), generator=generator).to(device)
        pixels = images[index].float().contiguous(memory_format=torch.channels_last)
        with policy.autocast():
            loss = F.cross_entropy(model(pixels).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        policy.backward_and_step(loss, optimizer)
        losses.append(loss.detach())

    model.train()
    for _ in range(s.warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(s.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    final = float(losses[-1])
    if not math.isfinite(final):
        raise RuntimeError(f"{precision}: the loss is {final}")
    return {"precision": precision, "label": "native" if policy.native else "simulated", "steps": s.steps,
            "batch": s.batch_size, "images_per_s": round(s.steps * s.batch_size / seconds, 1),
            "seconds": round(seconds, 2), "final_loss": round(final, 4), "detail": policy.detail}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teacher_fill(s: Settings) -> dict:
    """The 12-block teacher's views of the training photos, filled with `s.fill_forward`."""
    from edgekd.data.sources import digest
    from edgekd.doctor.paths import fill_views
    from edgekd.models.classifier import Classifier
    from edgekd.models.registry import create_model
    from edgekd.recipe import AugmentConfig

    recipe, split = _train_split("intel_teacher.yaml", s, s.fill_photos_per_class)
    net = create_model(recipe.model.name, int(split.labels.max()) + 1, **recipe.model.args)
    model = Classifier(net, (0.45, 0.45, 0.45), (0.25, 0.25, 0.25))
    meta = {"class_names": recipe.data.classes, "image_size": recipe.data.image_size,
            "sha256": digest("gpu-check untrained teacher", time.time())}  # a fresh entry: always a real fill
    started = time.perf_counter()
    detail = fill_views(model, meta, split, AugmentConfig(crop="resized", flip=True), s.fill_forward, s.device,
                        s.out / "cache", count=2, batch_size=256)
    return {"forward": s.fill_forward, "photos": len(split.rows), "seconds": round(time.perf_counter() - started, 1),
            "detail": detail}


def table(results: dict) -> str:
    lines = [f"paper setting: {results['model']}, {results['image_size']} px, batch {results['batch']}, "
             f"{results['steps']} timed steps on {results['device_name']}", "",
             "| precision | label | images/s | seconds | final loss |", "|---|---|---:|---:|---:|"]
    for row in results["throughput"]:
        if "error" in row:
            lines.append(f"| {row['precision']} | failed: {row['error']} | | | |")
        else:
            lines.append(f"| {row['precision']} | {row['label']} | {row['images_per_s']:.0f} | {row['seconds']:.1f} | "
                         f"{row['final_loss']:.3f} |")
    fill = results["teacher_fill"]
    lines += ["", f"teacher fill ({fill.get('forward')}): " + (fill.get("detail") or f"failed: {fill.get('error')}")]
    return "\n".join(lines)


def run(s: Settings) -> dict:
    import torch

    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu for the CPU form")
    s.out.mkdir(parents=True, exist_ok=True)
    recipe, split = _train_split("intel_8block.yaml", s, s.max_per_class)
    results = {"model": f"{recipe.model.name} {recipe.model.args}", "image_size": recipe.data.image_size,
               "batch": s.batch_size, "steps": s.steps, "photos": len(split.rows),
               "device_name": torch.cuda.get_device_name() if s.device == "cuda" else "cpu", "throughput": []}
    for precision in s.precisions:  # one failing precision must not hide the others
        try:
            results["throughput"].append(throughput(s, precision, recipe, split))
        except Exception as exc:
            results["throughput"].append({"precision": precision, "error": f"{exc.__class__.__name__}: {exc}"[:300]})
    try:
        results["teacher_fill"] = teacher_fill(s)
    except Exception as exc:
        results["teacher_fill"] = {"forward": s.fill_forward, "error": f"{exc.__class__.__name__}: {exc}"[:300]}
    (s.out / "paper_setting.json").write_text(json.dumps(results, indent=1))
    (s.out / "paper_setting.md").write_text(table(results) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/datasets/intel-sample", help="the Intel sample (train/<class>/)")
    parser.add_argument("--out", required=True, help="folder for paper_setting.json/.md and the cache")
    parser.add_argument("--cpu", action="store_true", help="the CPU form: toy step counts at 48 px, no CUDA needed")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16", "fp8"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per precision [300; --cpu: 1]")
    parser.add_argument("--batch-size", type=int, default=None, help="[224; --cpu: 8]")
    results = run(settings(parser.parse_args()))
    print(table(results))
    failed = [r for r in results["throughput"] if "error" in r] + (["fill"] if "error" in results["teacher_fill"] else [])
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
