import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import RECIPES, write_recipe

from edgekd.cli import cli
from edgekd.errors import EdgekdError, RecipeError
from edgekd.sweep import SweepEvents, SweepPlan, load_sweep, plan_members, run_sweep
from edgekd.train.trainer import Callbacks


def write_sweep(tmp_path, image_dataset, **keys):
    """A teacher (3 blocks) and one student (1 block) at 16 px, two epochs each."""
    write_recipe(tmp_path / "t.yaml", image_dataset, model={"blocks": 3})
    write_recipe(tmp_path / "s.yaml", image_dataset, model={"blocks": 1}, teacher={"recipe": "t.yaml"},
                 distill={"temperature": 2.0, "alpha": 0.5})
    sweep = {"name": "tiny", "teacher": "t.yaml", "students": ["s.yaml"], **keys}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


class Recorder(SweepEvents):
    def __init__(self, stop_after_epoch: dict | None = None):
        self.actions: dict[str, str] = {}
        self.stop = stop_after_epoch or {}

    def on_member(self, index, total, member, state):
        self.actions[member.name] = state.action

    def training(self, member):
        stop_at = self.stop.get(member.name)

        class Stopper(Callbacks):
            def on_epoch_end(self, record):
                if record["epoch"] == stop_at:
                    raise KeyboardInterrupt

        return Stopper()


def summaries(sweep_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def test_a_sweep_runs_every_member_and_skips_the_finished_ones_when_run_again(tmp_path, image_dataset):
    path = write_sweep(tmp_path, image_dataset, precisions={"s.yaml": ["fp16"]})
    artifacts = tmp_path / "artifacts"
    events = Recorder()
    state = run_sweep(SweepPlan(path, ["train.epochs=2"], artifacts), events)
    sweep_dir = artifacts / "tiny"
    assert list(state["members"]) == ["t", "s", "s_nokd", "s_fp16"]
    assert set(events.actions.values()) == {"run"}
    runs = summaries(sweep_dir)
    assert sorted(runs) == ["s", "s_fp16", "s_nokd", "t"]  # one folder per member, no -2
    assert all(s["status"] == "finished" for s in runs.values())
    teacher_pt = str((sweep_dir / "t" / "best.pt").absolute())
    assert runs["s"]["mode"] == runs["s_fp16"]["mode"] == "distill"
    assert runs["s"]["teacher"]["checkpoint"] == runs["s_fp16"]["teacher"]["checkpoint"] == teacher_pt
    assert runs["s_nokd"]["mode"] == "train" and runs["s_nokd"]["teacher"] is None
    assert runs["s_nokd"]["model"] == runs["s"]["model"]
    assert runs["s_fp16"]["precision"]["mode"] == "fp16"
    on_disk = json.loads((sweep_dir / "sweep.json").read_text())
    assert on_disk["members"]["s_nokd"]["baseline_of"] == "s" and on_disk["members"]["s"]["status"] == "finished"

    mtimes = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/*") if p.is_file()}
    again = Recorder()
    run_sweep(SweepPlan(path, ["train.epochs=2"], artifacts), again)
    assert set(again.actions.values()) == {"skip"}
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/*") if p.is_file()} == mtimes
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["s", "s_fp16", "s_nokd", "t"]


def test_an_interrupted_member_is_resumed_not_restarted(tmp_path, image_dataset):
    path = write_sweep(tmp_path, image_dataset, baselines="none")
    artifacts = tmp_path / "artifacts"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepPlan(path, ["train.epochs=2"], artifacts), Recorder(stop_after_epoch={"s": 1}))
    sweep_dir = artifacts / "tiny"
    state = json.loads((sweep_dir / "sweep.json").read_text())
    assert state["members"]["t"]["status"] == "finished" and state["members"]["s"]["status"] == "interrupted"
    events = Recorder()
    run_sweep(SweepPlan(path, ["train.epochs=2"], artifacts), events)
    assert events.actions == {"t": "skip", "s": "resume"}
    records = [json.loads(line) for line in (sweep_dir / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert not (sweep_dir / "s-2").exists()
    assert json.loads((sweep_dir / "sweep.json").read_text())["members"]["s"]["status"] == "finished"


def test_a_killed_sweep_resumes_its_member_from_the_mid_epoch_state(tmp_path, image_dataset):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    path = write_sweep(tmp_path, image_dataset, baselines="none")
    sets = ["--set", "train.epochs=2", "--set", "train.checkpoint_seconds=0.01", "--no-export"]

    def sweep(artifacts):
        return subprocess.Popen([sys.executable, "-m", "edgekd", "-q", "sweep", str(path), "--artifacts",
                                 str(artifacts), *sets], env={**os.environ, "EDGEKD_CACHE": str(tmp_path / "cache")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mid_epoch(last):
        try:
            progress = torch.load(last, weights_only=True)["train_state"]["epoch_progress"]
        except (OSError, RuntimeError, EOFError, KeyError):
            return False
        return bool(progress) and progress["next_batch"] > 0

    assert sweep(tmp_path / "whole").wait(timeout=300) == 0
    killed = sweep(tmp_path / "cut")
    last = tmp_path / "cut" / "tiny" / "s" / "last.pt"
    deadline = time.time() + 300  # a hang guard: startup on 2 busy cores can take minutes
    while not mid_epoch(last):
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    rerun = sweep(tmp_path / "cut")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming" in out + err and ", batch " in out + err
    state = json.loads((tmp_path / "cut" / "tiny" / "sweep.json").read_text())
    assert state["members"]["s"]["status"] == "finished" and not (tmp_path / "cut" / "tiny" / "s-2").exists()
    a = torch.load(tmp_path / "whole" / "tiny" / "s" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_made_with_other_settings_is_refused(tmp_path, image_dataset):
    path = write_sweep(tmp_path, image_dataset, baselines="none", students=[])
    artifacts = tmp_path / "artifacts"
    run_sweep(SweepPlan(path, ["train.epochs=1"], artifacts))
    with pytest.raises(EdgekdError, match=r"other settings.*train.epochs: 1 then, 2 now"):
        run_sweep(SweepPlan(path, ["train.epochs=2"], artifacts))


def test_overrides_reach_every_member_and_the_intel_sweep_plans_the_papers_runs(tmp_path):
    sweep = load_sweep(RECIPES / "intel_sweep.yaml")
    members = plan_members(sweep, ["data.image_size=32", "train.epochs=3"], tmp_path / "intel_sweep")
    assert [m.name for m in members] == [
        "intel_teacher", "intel_teacher_fp16", "intel_teacher_fp8",
        "intel_10block", "intel_10block_nokd", "intel_8block", "intel_8block_nokd", "intel_8block_fp16",
        "intel_8block_fp8", "intel_6block", "intel_6block_nokd", "intel_4block", "intel_4block_nokd"]
    assert {(m.recipe.data.image_size, m.recipe.train.epochs) for m in members} == {(32, 3)}
    teacher_pt = str((tmp_path / "intel_sweep" / "intel_teacher" / "best.pt").absolute())
    for m in members:
        assert m.recipe.precision == m.precision
        assert m.recipe.teacher.recipe is None
        assert m.recipe.teacher.checkpoint == (teacher_pt if m.mode == "distill" else None)
    assert [m.baseline_of for m in members if m.role == "baseline"] == [
        "intel_10block", "intel_8block", "intel_6block", "intel_4block"]
    assert sweep.export.enabled and sweep.export.precisions == ["int8"]


@pytest.mark.parametrize("keys, message", [
    ({"studnets": ["s.yaml"]}, "unknown key studnets; did you mean students?"),
    ({"precisions": {"x.yaml": ["fp16"]}}, "unknown key x.yaml"),
    ({"precisions": {"s.yaml": ["fp4"]}}, "precisions.s.yaml: ['fp4'] may only name bf16, fp16, fp8"),
    ({"export": {"enabeld": True}}, "unknown key export.enabeld; did you mean export.enabled?"),
    ({"baselines": "some"}, "'some' is not one of students, all, none"),
    ({"students": ["missing.yaml"]}, "recipe 'missing.yaml' does not exist"),
])
def test_a_bad_sweep_file_is_one_clear_error(tmp_path, image_dataset, keys, message):
    path = write_sweep(tmp_path, image_dataset, **keys)
    with pytest.raises(RecipeError) as error:
        load_sweep(path)
    assert message in error.value.message


def test_cli_sweep_runs_then_skips_and_maps_errors_to_exit_codes(tmp_path, image_dataset):
    runner = CliRunner()
    path = write_sweep(tmp_path, image_dataset, baselines="none")
    result = runner.invoke(cli, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "[2/2] s" in result.output and "distill" in result.output and "run" in result.output
    result = runner.invoke(cli, ["sweep", str(path), "--set", "train.epochs=1", "--set", "data.image_size=12"])
    assert result.exit_code == 0, result.output
    assert "[1/2] t (train, teacher, fp32): running" in result.output and "epoch   1" in result.output
    assert "edgekd report" in result.output
    assert json.loads((tmp_path / "artifacts" / "tiny" / "s" / "summary.json").read_text())["dataset"]["image_size"] == 12
    result = runner.invoke(cli, ["sweep", str(path), "--set", "train.epochs=1", "--set", "data.image_size=12"])
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped, finished") == 2 and "epoch   1" not in result.output
    result = runner.invoke(cli, ["sweep", str(write_sweep(tmp_path, image_dataset, teachr="t.yaml"))])
    assert result.exit_code == 2 and "did you mean teacher?" in result.output and "Traceback" not in result.output


def test_an_export_that_cannot_meet_the_gate_is_recorded_and_the_sweep_goes_on(tmp_path, image_dataset,
                                                                                 monkeypatch):
    import edgekd.export as export_module

    real = export_module.export_checkpoint

    def int8_misses_the_gate(plan):
        real(export_module.ExportPlan(plan.checkpoint, [], plan.out_dir))  # fp32 written, as the exporter does
        raise export_module.ExportError("int8: no float layers within the cap met the gate (-3.00 pts)")

    monkeypatch.setattr(export_module, "export_checkpoint", int8_misses_the_gate)
    path = write_sweep(tmp_path, image_dataset, baselines="none", export={"enabled": True, "precisions": ["int8"],
                                                                          "latency_seconds": 0.05})
    state = run_sweep(SweepPlan(path, ["train.epochs=1"], tmp_path / "artifacts"))
    export = state["members"]["s"]["export"]
    assert export["failures"]["export"] == ["int8: no float layers within the cap met the gate (-3.00 pts)"]
    assert (tmp_path / "artifacts" / "tiny" / "s" / "validation.json").is_file()  # fp32 still validated


def test_the_sweeps_continue_line_keeps_artifacts_overrides_and_export(tmp_path, image_dataset, monkeypatch):
    import shlex

    import edgekd.sweep as sweep_module

    path = write_sweep(tmp_path, image_dataset, baselines="none")

    def interrupted(plan, events):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module, "run_sweep", interrupted)
    args = ["sweep", str(path), "--set", "train.epochs=1", "--set", "data.root=a folder", "--artifacts",
            str(tmp_path / "my runs"), "--no-export"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130
    assert shlex.split(result.output.split("Continue with the same command: ")[1]) == ["edgekd", *args]


def test_a_damaged_sweep_json_is_passed_over_by_the_newest_sweep_lookup(tmp_path, caplog):
    from edgekd.sweep import find_sweep_dirs

    for name, content in [("good", '{"members": {"t": {"name": "t"}}}'), ("list", "[1]"),
                          ("members_list", '{"members": [1]}'), ("member_str", '{"members": {"t": "x"}}'),
                          ("garbled", "\x00{")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(content)
    with caplog.at_level("WARNING", logger="edgekd"):
        assert find_sweep_dirs(tmp_path) == [tmp_path / "good"]
    assert caplog.text.count("that sweep is skipped") == 4


def test_a_resumed_member_under_other_settings_is_refused_not_mixed(tmp_path, image_dataset):
    path = write_sweep(tmp_path, image_dataset, baselines="none")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SweepPlan(path, ["train.epochs=2"], tmp_path / "artifacts"), Recorder({"t": 1}))
    with pytest.raises(RecipeError, match="cannot resume .* data.image_size: 16 then, 12 now"):
        run_sweep(SweepPlan(path, ["train.epochs=2", "data.image_size=12"], tmp_path / "artifacts"))
    assert json.loads((tmp_path / "artifacts" / "tiny" / "t" / "summary.json").read_text())["status"] == "interrupted"
