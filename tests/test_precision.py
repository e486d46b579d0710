import json
import logging

import pytest
import torch
from click.testing import CliRunner

from edgekd.cli import cli
from edgekd.errors import RecipeError
from edgekd.recipe import load_recipe
from edgekd.runs import MetricsLog
from edgekd.train import precision as precision_module
from edgekd.train.precision import (cpu_has_native_bf16, fp8_quantize_dequantize, fp8_weight_scale, fp16_round,
                                    make_policy)
from edgekd.train.trainer import run
from test_train import StopAfter, _strip_timing


def _train(recipe_path, artifacts, *overrides, mode="train", **kwargs):
    summary = run(load_recipe(recipe_path, ["train.epochs=3", *overrides]), mode, artifacts, **kwargs)
    return summary, MetricsLog(artifacts / summary["run"] / "metrics.jsonl").read()


def test_fp8_quantize_dequantize_equals_an_independent_float8_round_trip():
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3) * torch.logspace(-3, 1, 8).view(8, 1, 1, 1)
    scale = weight.abs().amax(dim=(1, 2, 3)) / 448.0
    expected = (weight / scale.view(8, 1, 1, 1)).to(torch.float8_e4m3fn).to(torch.float32) * scale.view(8, 1, 1, 1)
    torch.testing.assert_close(fp8_weight_scale(weight), scale)
    torch.testing.assert_close(fp8_quantize_dequantize(weight, fp8_weight_scale(weight)), expected, rtol=0, atol=0)


def test_rounding_passes_gradients_straight_through():
    w = torch.randn(4, 5, requires_grad=True)
    (fp8_quantize_dequantize(w, fp8_weight_scale(w)) * 3).sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 3.0))
    x = torch.tensor([1.0 + 2 ** -12], requires_grad=True)
    assert fp16_round(x).item() == 1.0  # below fp16's resolution at 1.0
    fp16_round(x).sum().backward()
    assert x.grad.item() == 1.0


def test_policies_say_what_runs_natively_here(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert make_policy("fp32", cpu).describe()["native"]
    bf16 = make_policy("bf16", cpu)
    assert bf16.native and bf16.autocast_dtype == torch.bfloat16
    with bf16.autocast():
        assert torch.nn.Linear(4, 2)(torch.randn(3, 4)).dtype == torch.bfloat16
    for mode in ("fp16", "fp8"):
        policy = make_policy(mode, cpu)
        assert not policy.native and policy.detail.startswith("simulated")


def test_bf16_without_bf16_instructions_is_labelled_emulated(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    policy = make_policy("bf16", torch.device("cpu"))
    assert not policy.native and policy.autocast_dtype == torch.bfloat16  # still runs, honestly labelled
    assert policy.detail.startswith("autocast bfloat16, emulated: this CPU has no AVX512-BF16/AMX")
    assert "slower than fp32" in policy.detail and "slower" in policy.warning
    assert make_policy("fp32", torch.device("cpu")).warning is None


def test_the_bf16_label_follows_the_processors_instructions(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    assert not cpu_has_native_bf16()  # oneDNN's own "bf16 supported" is true on any AVX-512 core: not asked
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_has_native_bf16() and make_policy("bf16", torch.device("cpu")).native


def test_an_emulated_bf16_run_warns_once_and_records_it(tmp_path, teacher_recipe, monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO):
        summary, records = _train(teacher_recipe, tmp_path / "a", "precision=bf16", "train.epochs=1",
                                  "train.device=cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "bf16 is emulated" in w]) == 1
    assert summary["precision"]["native"] is False and "emulated" in summary["precision"]["detail"]
    assert all(r["precision_native"] is False for r in records)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp8"])
def test_each_precision_trains_with_falling_loss_and_is_recorded(tmp_path, teacher_recipe, precision):
    summary, records = _train(teacher_recipe, tmp_path / "a", f"precision={precision}")
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    native = precision == "bf16" and (torch.cuda.is_available() or cpu_has_native_bf16())
    assert all(r["precision"] == precision and r["precision_native"] is native for r in records)
    assert summary["precision"]["mode"] == precision and summary["precision"]["native"] is native
    checkpoint = torch.load(tmp_path / "a" / "tiny_teacher" / "best.pt", weights_only=True)
    assert checkpoint["precision"]["mode"] == precision and checkpoint["precision"]["native"] is native
    assert ("fp8_weight_scales" in checkpoint) is (precision == "fp8")


def test_fp8_training_keeps_its_weight_scales_for_the_export(tmp_path, teacher_recipe):
    _train(teacher_recipe, tmp_path / "a", "precision=fp8")
    checkpoint = torch.load(tmp_path / "a" / "tiny_teacher" / "best.pt", weights_only=True)
    scales = checkpoint["fp8_weight_scales"]
    weight = checkpoint["state_dict"]["net.stem.0.weight"]
    torch.testing.assert_close(scales["net.stem.0.weight"], weight.abs().flatten(1).amax(1) / 448.0)
    assert len(scales) == sum(1 for k in checkpoint["state_dict"] if k.endswith(".weight")
                              and checkpoint["state_dict"][k].dim() in (2, 4))


def test_an_interrupted_fp8_run_resumes_exactly(tmp_path, teacher_recipe):
    overrides = ["precision=fp8", "train.epochs=3"]
    whole = run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "cut", callbacks=StopAfter(1))
    run(load_recipe(teacher_recipe, overrides), "train", tmp_path / "cut", resume=True)
    a = MetricsLog(tmp_path / "whole" / whole["run"] / "metrics.jsonl").read()
    b = MetricsLog(tmp_path / "cut" / whole["run"] / "metrics.jsonl").read()
    assert _strip_timing(a) == _strip_timing(b)


def test_adam8bit_trains(tmp_path, teacher_recipe):
    pytest.importorskip("bitsandbytes")
    summary, records = _train(teacher_recipe, tmp_path / "a", "train.optimizer=adam8bit", "train.lr=0.003",
                              "model.blocks=4")
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    last = torch.load(tmp_path / "a" / "tiny_teacher" / "last.pt", weights_only=True)
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in last["train_state"]["optimizer"]["state"].values()]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments for the big tensors


def test_a_missing_bitsandbytes_is_refused_before_any_work(tmp_path, teacher_recipe, monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(RecipeError, match="pip install 'bitsandbytes>=0.50'"):
        run(load_recipe(teacher_recipe, ["train.optimizer=adam8bit"]), "train", tmp_path / "a")
    assert not (tmp_path / "cache").exists()


def test_cli_precision_flag_and_int8_head_evaluation(tmp_path, teacher_recipe, student_recipe):
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(teacher_recipe), "--precision", "fp16", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "precision fp16 (simulated)" in result.output and "rounded to fp16" in result.output
    result = runner.invoke(cli, ["distill", str(student_recipe), "--precision", "fp8", "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "artifacts" / "tiny_student" / "summary.json").read_text())
    assert summary["precision"]["mode"] == "fp8" and not summary["precision"]["native"]
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "artifacts" / "tiny_student"), "--split", "val",
                                 "--int8-head"])
    assert result.exit_code == 0, result.output
    assert "bitsandbytes int8" in result.output
