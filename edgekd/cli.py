"""The `edgekd` command: one thin command per stage. Each parses, calls one library function, prints.

Stages are imported inside their command, so `edgekd classify` never imports torch.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from edgekd import __version__
from edgekd.errors import EdgekdError


# Commands that need the training extra (torch and friends); a device install has only `classify`.
TRAINING_COMMANDS = frozenset({"init", "train", "distill", "evaluate", "summary", "export", "validate", "sweep",
                               "report"})
TRAINING_MODULES = frozenset({"torch", "torchvision", "timm", "onnx", "onnxscript", "matplotlib"})
TRAIN_EXTRA_HINT = "pip install 'edgekd[train]'"


def _has_training_extra() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None  # finds, does not import


class _Group(click.Group):
    """Turns the errors users can fix into one clear message and an exit code, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgekdError as exc:
            click.secho(f"Error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in TRAINING_MODULES:
                raise
            click.secho(f"Error: {ctx.invoked_subcommand or 'this command'} needs {exc.name}, part of the training "
                        f"extra: {TRAIN_EXTRA_HINT}", fg="red", err=True)
            ctx.exit(1)

    def resolve_command(self, ctx: click.Context, args):
        name, command, rest = super().resolve_command(ctx, args)
        wants_help = any(a in ("--help", "-h") for a in rest)
        if name in TRAINING_COMMANDS and not wants_help and not _has_training_extra():
            raise EdgekdError(f"edgekd {name} needs PyTorch, which this install lacks (a device install only "
                              f"classifies): {TRAIN_EXTRA_HINT}")
        return name, command, rest

    def format_commands(self, ctx: click.Context, formatter) -> None:
        if _has_training_extra():
            return super().format_commands(ctx, formatter)
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            text = command.get_short_help_str(limit=formatter.width - 40)
            rows.append((name, f"[train extra] {text}" if name in TRAINING_COMMANDS else text))
        with formatter.section("Commands"):
            formatter.write_dl(rows)
        formatter.write_paragraph()
        formatter.write_text(f"This install has no PyTorch: commands marked [train extra] need {TRAIN_EXTRA_HINT}.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Train a teacher, distill a small student, and take it to an edge device."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(message)s" if verbose else "  %(message)s"))
    logger = logging.getLogger("edgekd")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    ctx.obj = {"quiet": quiet}


def _recipe_options(command):
    command = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                           help="Override a recipe value (repeatable), e.g. --set train.epochs=5.")(command)
    command = click.option("--resume", is_flag=True,
                           help="Continue the newest run of this recipe from its last.pt.")(command)
    command = click.option("--artifacts", type=click.Path(file_okay=False), default=None,
                           help="Where runs live (default: $EDGEKD_ARTIFACTS or ./artifacts).")(command)
    command = click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Processes on this machine (starts torchrun: DistributedDataParallel, one "
                                "process per GPU, or sharing the CPU cores).")(command)
    command = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "fp8"]), default=None,
                           help="Training precision (overrides the recipe); the run records whether it "
                                "ran natively or simulated on this device.")(command)
    return click.argument("recipe", type=click.Path(dir_okay=False))(command)


def _progress_callbacks(quiet: bool):
    from edgekd.train.trainer import Callbacks

    class Printer(Callbacks):
        bar = None
        resumed_batches = 0

        def on_start(self, info: dict) -> None:
            precision = info["precision"]
            kind = "native" if precision["native"] else "simulated"
            click.echo(f"run       {info['run_dir']} ({info['mode']})")
            click.echo(f"device    {info['device']}, precision {precision['mode']} ({kind}), "
                       f"{info['torch_threads']} torch threads")
            if precision["mode"] != "fp32":
                click.echo(f"          {precision['detail']}")
            click.echo(f"dataset   {info['dataset']}")
            if info["skipped_images"]:
                click.echo(f"skipped   {info['skipped_images']} unreadable image(s) (listed in summary.json)")
            click.echo(f"model     {info['model']}: {info['parameters']:,} parameters")
            if info["teacher"]:
                click.echo(f"teacher   {info['teacher']}")
            if info.get("teacher_forward"):
                click.echo(f"          runs live on every batch: {info['teacher_forward']}, the fastest here")
            if info["distributed"]["world_size"] > 1:
                d = info["distributed"]
                click.echo(f"processes {d['world_size']} ({d['backend']}, {d['processes_per_node']} per node; "
                           f"train.batch_size is the global batch)")
            fill = info.get("teacher_views_fill")
            if fill:
                click.echo(f"views     teacher ran on {fill['views']:,} views in {fill['seconds']:.0f} s "
                           f"({fill['forward']}, the fastest here)")
            self.resumed_batches = info.get("resumed_at_batch") or 0
            if self.resumed_batches:
                click.echo(f"resuming  epoch {info['resumed_from_epoch'] + 1} at batch {self.resumed_batches}")
            elif info["resumed_from_epoch"] is not None:
                click.echo(f"resuming  after epoch {info['resumed_from_epoch']}")

        def on_epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
            if not quiet:
                self.bar = click.progressbar(length=batches, label=f"epoch {epoch}/{epochs}", file=sys.stderr,
                                             item_show_func=lambda loss: f"loss {loss:.4f}" if loss else "")
                self.bar.__enter__()
                self.bar.update(self.resumed_batches)  # the batches a resumed epoch had done before
            self.resumed_batches = 0

        def on_batch(self, images: int, loss: float) -> None:
            if self.bar is not None:
                self.bar.update(1, loss)

        def on_epoch_end(self, record: dict) -> None:
            if self.bar is not None:
                self.bar.__exit__(None, None, None)
                self.bar = None
            click.echo(f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
                       f"val loss {record['val_loss']:.4f}  val acc {record['val_acc']:.2%}  "
                       f"{record['seconds']:.1f}s  {record['images_per_s']:.0f} img/s")

        def on_end(self, summary: dict) -> None:
            click.echo(f"{summary['status']} after {summary['epochs_done']} epoch(s): best val acc "
                       f"{summary['best_val_acc']:.2%} at epoch {summary['best_epoch']}")

    return Printer()


def _under_torchrun(nproc: int) -> None:
    """Run this same command in `nproc` processes started by torchrun, and exit with its exit code."""
    import os
    import subprocess

    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # drop --nproc N / --nproc=N: the children run one process each
        if arg == "--nproc":
            del argv[i:i + 2]
            break
        if arg.startswith("--nproc="):
            del argv[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "edgekd", *argv]
    click.echo(f"starting {nproc} processes: {' '.join(command[1:])}", err=True)
    sys.exit(subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}))


def _run_stage(mode: str, recipe_path: str, overrides, resume: bool, artifacts, precision, quiet: bool,
               nproc: int = 1) -> None:
    import os

    from edgekd.recipe import load_recipe
    from edgekd.runs import artifacts_root
    from edgekd.train.distributed import check_world_size
    from edgekd.train.trainer import run

    recipe = load_recipe(recipe_path, [*overrides, *([f"precision={precision}"] if precision else [])])
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_world_size(recipe.train.batch_size, nproc)  # before torchrun starts a single process
        _under_torchrun(nproc)
    root = artifacts_root(artifacts)
    try:
        summary = run(recipe, mode, root, resume=resume, callbacks=_progress_callbacks(quiet))
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (train.stop_signals.Stopped), or another ^C
        nproc = int(os.environ.get("WORLD_SIZE", nproc))
        saved = getattr(stop, "saved", None)
        state = (f"stopped; the training state at {saved} is saved" if saved else
                 "interrupted; the newest training state is saved (epoch ends and every train.checkpoint_seconds)")
        click.echo(f"\n{state}. Continue with: "
                   f"{_continue_command(mode, recipe_path, overrides, artifacts, precision, nproc)}", err=True)
        sys.exit(getattr(stop, "exit_code", 130))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        best = root / summary["run"] / "best.pt"
        click.echo(f"saved     {best}" if best.is_file() else f"no best.pt in {best.parent} (no epoch finished)")


def _continue_command(mode: str, recipe_path: str, overrides, artifacts, precision, nproc: int) -> str:
    """The command that resumes this same run: every option that chose its recipe and folder, shell-quoted."""
    return _command_line([mode, recipe_path], overrides, artifacts,
                         [*(["--precision", precision] if precision else []),
                          *(["--nproc", str(nproc)] if nproc > 1 else []), "--resume"])


def _command_line(head: list[str], overrides, artifacts, tail: list[str]) -> str:
    """`edgekd HEAD --set O... [--artifacts A] TAIL`, shell-quoted: how a stopped stage or sweep is continued."""
    import shlex

    words = ["edgekd", *head, *(w for o in overrides for w in ("--set", o)),
             *(["--artifacts", str(artifacts)] if artifacts else []), *tail]
    return shlex.join(words)


@cli.command()
@_recipe_options
@click.pass_obj
def train(obj, recipe, overrides, resume, artifacts, precision, nproc) -> None:
    """Train a model (a teacher) on a recipe's dataset with cross-entropy."""
    _run_stage("train", recipe, overrides, resume, artifacts, precision, obj["quiet"], nproc)


@cli.command()
@_recipe_options
@click.pass_obj
def distill(obj, recipe, overrides, resume, artifacts, precision, nproc) -> None:
    """Distill a student from the recipe's teacher: α·T²·KL + (1−α)·CE."""
    _run_stage("distill", recipe, overrides, resume, artifacts, precision, obj["quiet"], nproc)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default="recipes", show_default=True,
              help="Where the two recipes are written.")
@click.option("--name", default=None, help="Recipe and run name [default: the data folder's name].")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="The teacher's input size in px [default: from the photos, 32-224]; the student's is at most 64.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of both the teacher and the student [default: from the data's size and this machine].")
@click.option("--budget", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Minutes of training (teacher + distillation) to size the recipes for on this machine.")
@click.option("--force", is_flag=True, help="Replace recipe files that already exist.")
@click.option("--quick", is_flag=True, help="A smoke run of the whole pipeline in minutes: 1 epoch at 32 px, "
                                            "validate on onnxruntime's CPU provider only.")
def init(data_dir, out, name, image_size, epochs, budget, force, quick) -> None:
    """Read a folder of photos and write a teacher and a student recipe for it, sized for this machine.

    DATA_DIR holds class folders (<class>/<photos>, subfolders too), or split folders (train/, val/, test/ in
    any case and usual spellings) of them; a folder of photos without classes becomes data.unlabeled.
    Prints the estimated minutes per stage and the commands to run next.
    """
    from edgekd.scaffold import describe_layout, init_project

    r = init_project(data_dir, out, name, image_size, epochs, budget, force, quick)
    s, t, p = r.survey, r.timing, r.plan
    counts = ", ".join(f"{c} {k}" for c, k in s.counts["train"].items())
    click.echo(f"dataset   {s.root}: {len(s.classes)} classes, {s.train_count} training photos ({counts})")
    click.echo(f"layout    {describe_layout(s)}")
    if s.unlabeled is not None:
        click.echo(f"unlabeled {s.unlabeled} ({s.unlabeled_count} photos without classes: data.unlabeled)")
    click.echo(f"photos    shorter side {s.photo_side} px (median; {s.photo_sides[0]}-{s.photo_sides[1]} in a sample)")
    click.echo(f"timed     {t.device}: teacher {t.teacher_train:.0f} img/s training at {p.teacher_size} px, "
               f"{t.teacher_forward:.0f} img/s forward; {p.student_blocks}-block student "
               f"{t.student_train[p.student_blocks]:.0f} img/s at {p.student_size} px ({p.precision}); "
               f"decoding {t.decode:.0f} photos/s ({t.seconds:.1f} s)")
    click.echo(f"wrote     {r.teacher_path}  EfficientNet-Lite0 (ImageNet, fine-tuned, {t.teacher_parameters:,} "
               f"parameters), {p.teacher_size} px, {p.teacher_epochs} epochs")
    click.echo(f"          {r.student_path}  {p.student_blocks}-block paper CNN "
               f"({t.student_parameters[p.student_blocks]:,} parameters), {p.student_size} px, "
               f"{p.student_epochs} epochs, {p.teacher_views} teacher views")
    if t.load is not None and t.load > t.cores:
        click.secho(f"warning   the machine is busy (load {t.load:.1f} on {t.cores} cores): the timed speeds, and so "
                    f"the sizes and estimates, are what it does now", fg="yellow")
    for warning in r.warnings:
        click.secho(f"warning   {warning}", fg="yellow")
    estimate = ", ".join(f"{stage} {minutes:.0f}" if minutes >= 1 else f"{stage} <1"
                         for stage, minutes in r.minutes.items())
    click.echo(f"estimate  minutes here: {estimate} (train and distill from the timed steps; export and "
               f"validate rough)")
    click.echo("\nnext:")
    for command in r.commands:
        click.echo(f"  {command}")


@cli.command()
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--data", "data_root", type=click.Path(file_okay=False), default=None,
              help="Dataset root, if it moved since training (default: the one in the checkpoint's recipe).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Where runs live, to find the newest one (default: $EDGEKD_ARTIFACTS or ./artifacts).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--int8-head", is_flag=True,
              help="Hold the classifier's Linear layers in bitsandbytes int8 (Linear8bitLt) while evaluating.")
def evaluate(checkpoint, split, data_root, batch_size, artifacts, as_json, int8_head) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a checkpoint on a split.

    CHECKPOINT is a .pt file or a run folder (its best.pt); without it, the newest run under artifacts/.
    The result is also written beside the checkpoint as eval_<split>.json.
    """
    from edgekd.evaluate import confusion_table, evaluate_checkpoint
    from edgekd.runs import atomic_write_json
    from edgekd.train.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint) if checkpoint else _newest_run(artifacts) / "best.pt"
    result = evaluate_checkpoint(path, split, data_root, batch_size, int8_head=int8_head)
    written = path.parent / f"eval_{split}.json"
    try:
        atomic_write_json(written, {"checkpoint": str(path), **result.to_dict()})
    except OSError as exc:  # a read-only run folder: the answer is still worth printing
        click.secho(f"warning: could not write {written}: {exc.strerror or exc}", fg="yellow", err=True)
        written = None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    weights = "fp32 weights, classifier Linear layers in bitsandbytes int8" if int8_head else "fp32 weights"
    click.echo(f"{path}: {split} accuracy {result.accuracy:.2%} on {result.images} images "
               f"(loss {result.loss:.4f}; {weights})\n")
    click.echo(confusion_table(result))
    if written:
        click.echo(f"\nwritten   {written}")


def _newest_run(artifacts, mode: str | None = None) -> Path:
    from edgekd.runs import artifacts_root, latest_run

    root = artifacts_root(artifacts)
    run_dir = latest_run(root, mode=mode)
    if run_dir is None:
        what = "distilled run" if mode == "distill" else "run with a best.pt"
        raise EdgekdError(f"no {what} under {root}/",
                          hint=f"run `edgekd {mode or 'train'} RECIPE` first, or name a run folder or checkpoint")
    click.echo(f"using the newest {'distilled ' if mode == 'distill' else ''}run: {run_dir}", err=True)
    return run_dir


@cli.command()
@click.argument("target", required=False, type=click.Path())
@click.option("--fp16", is_flag=True, help="Also export fp16 weights and compute (for GPU/NPU runtimes).")
@click.option("--int8", is_flag=True, help="Also export int8 (static QDQ, per-channel; the fast CPU path).")
@click.option("--fp8", is_flag=True, help="Also export fp8 e4m3 weights with per-channel scales.")
@click.option("--all", "all_", is_flag=True, help="Export every precision.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <run>/exports).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None,
              help="Real training images (class-balanced, seeded) that calibrate int8 [recipe: 300].")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
              help="How int8 activation ranges are set: observed extremes, 99.99th percentile, or entropy "
                   "[recipe: minmax].")
@click.option("--keep-float", multiple=True, type=click.Choice(["stem", "classifier"]),
              help="Start the int8 and fp8 graphs with these layers in float (repeatable) [recipe: none].")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="The int8/fp8 gate: largest accuracy drop (points) on held-out images [recipe: 0.5].")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="The int8/fp8 gate: smallest top-1 agreement with PyTorch [recipe: 0.99].")
@click.option("--max-float-layers", type=click.IntRange(min=0), default=None,
              help="Most layers the search may keep in float to meet the gate [default: a third of them].")
@click.option("--data", "data_root", type=click.Path(file_okay=False), default=None,
              help="Dataset root, if it moved since training.")
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Where runs live, to find the newest distilled one.")
def export(target, fp16, int8, fp8, all_, out, calibration_images, calibration_method, keep_float, max_drop,
           min_agreement, max_float_layers, data_root, artifacts) -> None:
    """Export a run or checkpoint to ONNX: fp32 always, plus --fp16, --int8, --fp8 or --all.

    TARGET is a run folder or a .pt file; without it, the newest distilled run under artifacts/.
    Each file is self-contained (weights inside, dynamic batch) and self-describing (classes, input
    size, mean/std, precision in its metadata). An int8 or fp8 file that misses the validate gate on
    held-out images keeps its most sensitive layers in float until it meets it; if none does, it is not
    written and the command fails.
    """
    from edgekd.export import PRECISIONS, ExportPlan, export_checkpoint
    from edgekd.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(target) if target else _newest_run(artifacts, mode="distill") / "best.pt"
    wanted = [p for p, flag in zip(PRECISIONS, (True, fp16, int8, fp8)) if flag or all_]
    out_dir = Path(out) if out else checkpoint.parent / "exports"
    results = export_checkpoint(ExportPlan(checkpoint, wanted, out_dir, calibration_images,
                                           list(keep_float) or None, data_root, calibration_method, max_drop,
                                           min_agreement, max_float_layers))
    fp32_size = results[0].size_bytes
    click.echo(f"\n{'file':<40} {'precision':<9} {'MB':>8} {'x fp32':>7} {'max|dlogit|':>12} {'top-1 agree':>12} "
               f"float layers")
    for r in results:
        floats = ", ".join(r.float_layers) if r.float_layers else ("none" if r.precision in ("int8", "fp8") else "")
        click.echo(f"{r.path.name!s:<40} {r.precision:<9} {r.size_bytes / 1e6:>8.2f} "
                   f"{r.size_bytes / fp32_size:>7.2f} {r.max_abs_logit_diff:>12.2e} {r.agreement:>12.2%} {floats}")
    click.echo(f"\nwritten   {out_dir} (compared with PyTorch fp32 on real validation images)")


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,32") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers, e.g. 1,32")
    return numbers


def _provider_list(ctx, param, value: str) -> list[str]:
    providers = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [p for p in providers if p not in ("cpu", "cuda", "tensorrt", "openvino")]
    if unknown or not providers:
        raise click.BadParameter(f"{value!r}: choose from cpu, cuda, tensorrt, openvino (comma-separated)")
    return providers


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "val"]), default=None,
              help="Split to measure accuracy on [default: test when the dataset has one, else val].")
@click.option("--providers", default="cpu,cuda,tensorrt,openvino", show_default=True, callback=_provider_list,
              help="onnxruntime providers, and openvino (OpenVINO's CPU device); those missing here are "
                   "listed as skipped with the reason.")
@click.option("--batch", "batch_sizes", default="1,32", show_default=True, callback=_int_list,
              help="Batch sizes to time.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="Largest accuracy drop (points) any variant may show [recipe: fp32/fp16 0.1, int8/fp8 0.5].")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="Smallest top-1 agreement with PyTorch [recipe: 0.99].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads [default: physical cores].")
@click.option("--latency-seconds", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Time spent timing each batch size, after warm-up.")
@click.option("--data", "data_root", type=click.Path(file_okay=False), default=None)
@click.option("--artifacts", type=click.Path(file_okay=False), default=None)
def validate(run_dir, split, providers, batch_sizes, max_drop, min_agreement, threads, latency_seconds,
             data_root, artifacts) -> None:
    """Check every export of a run against its PyTorch original: accuracy, agreement, latency, memory.

    RUN_DIR defaults to the newest distilled run. Exits 1 when any variant breaks its thresholds.
    """
    from edgekd.validate import ValidationPlan, validate_run
    from edgekd.validate.report import earlier_lines, terminal_table, write_reports

    run = Path(run_dir) if run_dir else _newest_run(artifacts, mode="distill")
    result = validate_run(ValidationPlan(run, split, providers, batch_sizes, threads, max_drop, min_agreement,
                                         latency_seconds, data_root))
    d = result.device
    click.echo(f"\n{result.images} images of the {result.split} split; {d['cpu']}, "
               f"{result.settings['threads']} threads; {', '.join(d['instruction_sets'])}; GPU: {d['gpu']}\n")
    click.echo(terminal_table(result))
    for skipped in result.skipped:
        click.echo(f"skipped   {skipped['variant']} ({skipped['file']}): {skipped['reason']}")
    for line in earlier_lines(result):
        click.echo(f"earlier   {line}")
    for warning in result.warnings:
        click.secho(f"warning   {warning}", fg="yellow", err=True)
    paths = write_reports(result, run)
    click.echo(f"\nwritten   {', '.join(str(p) for p in paths)}")
    if result.failures:
        for name, reasons in result.failures.items():
            click.secho(f"FAIL      {name}: {'; '.join(reasons)}", fg="red", err=True)
        sys.exit(1)
    if not result.gated_rows:
        click.secho("FAIL      no export was measured here (every row was skipped): nothing passed the gate",
                    fg="red", err=True)
        sys.exit(1)
    click.echo("every variant is within its thresholds")


@cli.command()
@click.argument("photos", nargs=-1, required=True)
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="An exported .onnx file (default: the newest export, int8 on CPU, fp16 on CUDA).")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "openvino"]), default="auto",
              show_default=True, help="onnxruntime's cpu, cuda or tensorrt provider, or OpenVINO's CPU device; auto: "
                                      "OpenVINO for an int8 file and 32 photos or more where it is installed on x86, else "
                                      "cpu.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime threads per batch [default: 1; batches run side by side, one per core].")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Where runs live, to find the newest export.")
def classify(photos, model_path, top_k, as_json, provider, threads, batch_size, artifacts) -> None:
    """Classify photos (files or folders) with an exported model. Needs no torch.

    Exit code 1 when any file could not be classified; the others are still answered.
    """
    import os

    if "numpy" not in sys.modules:
        # numpy's OpenBLAS starts a thread per core when imported (30 ms of a cold start on 2 cores) and
        # classify does no linear algebra. Only before numpy's import, and only if the user has not chosen.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from edgekd.classify import expand_inputs, newest_export, open_exported

    files = expand_inputs(list(photos))
    if model_path is None:
        from edgekd.runs import artifacts_root  # only here: it imports more than a device needs

        model_path = newest_export(artifacts_root(artifacts), "cpu" if provider == "auto" else provider)
        click.echo(f"using the newest export: {model_path}", err=True)
    model = open_exported(Path(model_path), provider, threads, len(files))
    failed = 0
    for result in model.classify(files, top_k, batch_size):
        failed += hasattr(result, "error")
        if as_json:
            click.echo(json.dumps(result.to_dict()))
        elif hasattr(result, "error"):
            click.echo(f"{_one_field(result.file)}\terror: {result.error}")
        else:
            others = ", ".join(f"{label} {p:.3f}" for label, p in result.top_k)
            click.echo(f"{_one_field(result.file)}\t{result.label}\t{result.probability:.3f}\t({others})")
    if failed:
        click.echo(f"{failed} file(s) could not be classified", err=True)
        sys.exit(1)


def _one_field(name: str) -> str:
    """A file name as one tab-separated field: a tab or newline in it (legal on Linux) would forge fields or
    whole output lines, so control characters are shown escaped, as Python writes them."""
    return name if name.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name)


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override recipe values.")
def summary(recipes, overrides) -> None:
    """Parameters and multiply-accumulates of each recipe's model at its input size."""
    from edgekd.models.summary import recipe_model_stats
    from edgekd.recipe import load_recipe

    rows = [recipe_model_stats(load_recipe(path, overrides)) for path in recipes]
    header = f"{'recipe':<26} {'model':<18} {'arguments':<34} {'input':>7} {'classes':>7} {'parameters':>12} " \
             f"{'MACs':>15}"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        args = ", ".join(f"{k}={v}" for k, v in row["args"].items()) or "-"
        click.echo(f"{row['recipe']:<26} {row['model']:<18} {args:<34} {row['image_size']:>5}px "
                   f"{row['classes']:>7} {row['parameters']:>12,} {row['macs']:>15,}")


def _sweep_events(quiet: bool):
    from edgekd.sweep import SweepEvents

    class Printer(SweepEvents):
        def on_member(self, index, total, member, state) -> None:
            what = f"{member.mode}, {member.role}, {member.precision}"
            if state.action == "skip":
                acc = state.summary.get("best_val_acc")
                detail = f"{state.summary['status']}, best val acc {acc:.2%}" if acc is not None else state.summary["status"]
                click.echo(f"[{index}/{total}] {member.name} ({what}): skipped, {detail} in {state.run_dir}")
            else:
                verb = f"resuming {state.run_dir}" if state.action == "resume" else "running"
                click.secho(f"\n[{index}/{total}] {member.name} ({what}): {verb}", bold=True)

        def training(self, member):
            return _progress_callbacks(quiet)

        def on_export(self, member, detail: str) -> None:
            click.echo(f"          {member.name}: {detail}")

    return Printer()


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe value in every member (repeatable), e.g. --set train.epochs=3.")
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Where the sweep folder goes (default: $EDGEKD_ARTIFACTS or ./artifacts).")
@click.option("--export/--no-export", "export", default=None,
              help="Export and validate the distilled students after training [sweep file: export.enabled].")
@click.option("--dry-run", is_flag=True, help="List the members and what would happen to each; train nothing.")
@click.pass_obj
def sweep(obj, sweep_file, overrides, artifacts, export, dry_run) -> None:
    """Train a teacher, its students, precision variants and no-KD baselines: seed 000's tables in one command.

    Finished members are skipped and an interrupted one is resumed, so running the same command again
    continues where it stopped. Then: edgekd report <artifacts>/<sweep name>.
    """
    from edgekd.runs import artifacts_root
    from edgekd.sweep import (
        SweepPlan,
        load_sweep,
        member_state,
        plan_members,
        run_sweep,
    )

    root = artifacts_root(artifacts)
    if dry_run:
        spec = load_sweep(sweep_file)
        members = plan_members(spec, list(overrides), root / spec.name)
        for i, member in enumerate(members, 1):
            state = member_state(member, root / spec.name)
            click.echo(f"[{i}/{len(members)}] {member.name:<24} {member.mode:<8} {member.role:<9} "
                       f"{member.precision:<5} {state.action}")
        return
    try:
        state = run_sweep(SweepPlan(sweep_file, list(overrides), root, export), _sweep_events(obj["quiet"]))
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM
        again = _command_line(["sweep", sweep_file], overrides, artifacts,
                              [] if export is None else ["--export" if export else "--no-export"])
        click.echo(f"\ninterrupted; finished members and epochs are saved. Continue with the same command: "
                   f"{again}", err=True)
        sys.exit(getattr(stop, "exit_code", 130))
    sweep_dir = root / state["sweep"]
    click.echo(f"\n{'member':<24} {'role':<9} {'precision':<9} {'status':<14} run folder")
    for m in state["members"].values():
        click.echo(f"{m['name']:<24} {m['role']:<9} {m['precision']:<9} {m['status']:<14} {m['run_dir']}")
    click.echo(f"\nwritten   {sweep_dir / 'sweep.json'}\nnext      edgekd report {sweep_dir}")


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where report.md/.html/.json go (default: the sweep folder, or the runs' common folder).")
@click.option("--artifacts", type=click.Path(file_okay=False), default=None,
              help="Where to look for the newest sweep when no path is given.")
def report(paths, out, artifacts) -> None:
    """Tables I–IV, training curves and confusion matrices of run folders or a sweep folder.

    PATHS are run folders, folders of runs, or a sweep folder (default: the newest sweep under artifacts/).
    Writes report.md, a self-contained report.html (images inline) and report.json.
    """
    from edgekd.report import write_report
    from edgekd.runs import artifacts_root
    from edgekd.sweep import find_sweep_dirs

    if not paths:
        sweeps = find_sweep_dirs(artifacts_root(artifacts))
        if not sweeps:
            raise EdgekdError(f"no sweep folder under {artifacts_root(artifacts)}/",
                              hint="run `edgekd sweep SWEEP_FILE` first, or name run folders or a sweep folder")
        paths = (str(sweeps[0]),)
        click.echo(f"using the newest sweep: {sweeps[0]}", err=True)
    result = write_report(list(paths), out)
    if result.report.scale_warning:
        click.secho(result.report.scale_warning, fg="yellow")
    for table in result.report.tables:
        click.echo(f"{table.title}: {len(table.rows)} row(s)")
    for line in result.report.omitted:
        click.echo(f"not shown: {line}")
    for line in result.collection.not_included:
        click.echo(f"not included: {line}")
    click.echo(f"written   {', '.join(str(p) for p in result.files)}")


def _print_sections(report: dict) -> None:
    for section, values in report.items():
        click.secho(section.replace("_", " "), bold=True)
        for key, value in values.items():
            if isinstance(value, dict):
                click.echo(f"  {key.replace('_', ' ')}")
                for inner, text in value.items():
                    click.echo(f"    {inner:<32} {text}")
                continue
            if isinstance(value, list):
                value = ", ".join(str(v) if not isinstance(v, dict) else
                                  " ".join(f"{k}={x}" for k, x in v.items()) for v in value) or "none"
            if isinstance(value, bool):
                value = "yes" if value else "no"
            click.echo(f"  {key.replace('_', ' '):<30} {'not installed' if value is None else value}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--smoke", is_flag=True, help="Also run a tiny job of every path this machine offers (a few minutes "
                                            "at most): training per precision and device, teacher fills, exports, "
                                            "runtimes, torchrun.")
@click.option("--only", multiple=True, metavar="WORDS",
              help="With --smoke: only the rows whose names contain WORDS (repeatable), and what they need.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="With --smoke: keep its work folder and a log per row here (default: a temporary folder).")
def doctor(as_json, smoke, only, out) -> None:
    """What this machine offers edgekd: CPU, torch/CUDA, runtimes, packages, cache, each stage's choice.

    Exit code 1 when a smoke row failed.
    """
    if (only or out) and not smoke:
        raise click.UsageError("--only and --out go with --smoke")
    from edgekd.doctor import machine_report

    report = machine_report()
    rows = None
    if smoke:
        from edgekd.doctor.smoke import smoke as run_smoke

        def show(row) -> None:
            if not as_json:
                colour = {"ok": "green", "failed": "red"}.get(row.status)
                click.echo(f"  {click.style(f'{row.status:<8}', fg=colour)}{row.name:<44} {row.seconds:>5.1f}s  "
                           f"{row.detail}")

        if not as_json:
            _print_sections(report)
            click.secho("smoke", bold=True)
        rows = run_smoke(Path(out) if out else None, list(only), show)
    if as_json:
        click.echo(json.dumps({**report, **({"smoke": [r.to_dict() for r in rows]} if rows is not None else {})},
                              indent=1))
    elif rows is None:
        _print_sections(report)
    if rows is not None:
        counts = {status: sum(r.status == status for r in rows) for status in ("ok", "failed", "skipped")}
        click.echo(f"smoke: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped", err=True)
        if counts["failed"]:
            sys.exit(1)


def main() -> None:
    cli(prog_name="edgekd")


if __name__ == "__main__":
    main()
