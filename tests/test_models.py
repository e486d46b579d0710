import numpy as np
import pytest
import torch

from conftest import RECIPES
from edgekd.errors import CheckpointError
from edgekd.models import (Classifier, create_model, freeze_backbone, load_pretrained, model_names,
                           register_model, set_train_mode)
from edgekd.models.summary import count_macs, count_parameters, recipe_model_stats
from edgekd.recipe import load_recipe
from edgekd.runtime.preprocess import normalize

PAPER_COUNTS = {"intel_teacher": 26_534_358, "intel_10block": 6_601_686, "intel_8block": 1_648_470,
                "intel_6block": 408_854, "intel_4block": 98_294}


@pytest.mark.parametrize("name, expected", PAPER_COUNTS.items())
def test_recipes_build_the_papers_exact_parameter_counts(name, expected):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe_model_stats(recipe)["parameters"] == expected
    model = create_model(recipe.model.name, 6, **recipe.model.args)  # real weights, not meta
    assert count_parameters(model) == expected


def test_paper_cnn_forward_shape_and_default_head():
    model = create_model("paper_cnn", 6, blocks=4).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 6)
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [32, 6]


def _final_feature_size(model, image_size: int) -> int:
    return model.blocks(model.stem(torch.zeros(1, 3, image_size, image_size))).shape[-1]


def test_downsample_caps_the_halvings_without_changing_the_parameters():
    paper = create_model("paper_cnn", 6, blocks=12, classifier=[512, 256]).eval()
    capped = create_model("paper_cnn", 6, blocks=12, classifier=[512, 256], downsample=4).eval()
    # the paper's 12 blocks halve six times: a 64 px image is down to 1×1 before the last block
    assert _final_feature_size(paper, 64) == 1 and _final_feature_size(capped, 64) == 4
    assert count_parameters(capped) == count_parameters(paper) == PAPER_COUNTS["intel_teacher"]
    assert count_macs(capped, 64) > 2 * count_macs(paper, 64)
    capped.load_state_dict(paper.state_dict())  # same tensors, only the strides differ
    assert create_model("paper_cnn", 6, blocks=8, downsample=4).blocks[-1].shortcut[0].stride == (2, 2)
    with pytest.raises(ValueError, match="downsample=-1"):
        create_model("paper_cnn", 6, downsample=-1)


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    model = create_model("paper_cnn", 6, blocks=4, zero_init_residual=True).eval()
    x = torch.randn(2, 16, 8, 8)
    block = model.blocks[0]  # 16 → 16 channels: identity shortcut
    assert torch.equal(block(x), torch.relu(x))
    default = create_model("paper_cnn", 6, blocks=4).eval()
    assert not torch.equal(default.blocks[0](x), torch.relu(x))


def test_macs_match_the_published_resnet18_figure():
    # torchvision lists ResNet-18 at 1.81 GFLOPS (multiply-accumulates) for a 224 px image.
    macs = count_macs(create_model("resnet18", 1000), 224)
    assert abs(macs / 1e9 - 1.81) < 0.01


def test_unknown_model_and_duplicate_registration():
    with pytest.raises(ValueError, match="valid models: .*paper_cnn"):
        create_model("vgg11", 6)
    assert {"paper_cnn", "resnet18", "resnet34"} <= set(model_names())
    with pytest.raises(ValueError, match="registered twice"):
        register_model(create_model.__globals__["_BUILDERS"]["paper_cnn"])


def test_classifier_normalises_inside_like_the_numpy_preprocessing():
    torch.manual_seed(0)
    net = create_model("paper_cnn", 3, blocks=2).eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = Classifier(net, mean, std).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    from_model = model(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    by_hand = net(torch.from_numpy(normalize(pixels, mean, std)))
    torch.testing.assert_close(from_model, by_hand, rtol=1e-5, atol=1e-5)


def test_freeze_backbone_trains_only_the_head_and_keeps_backbone_bn_fixed():
    model = Classifier(create_model("resnet18", 4), (0.5,) * 3, (0.25,) * 3)
    freeze_backbone(model.net)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.head.1.weight", "net.head.1.bias"}
    set_train_mode(model, frozen_backbone=True)
    assert not model.net.backbone.bn1.training
    assert model.net.head.training


def test_load_pretrained_takes_a_local_torchvision_file(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    net = create_model("resnet18", 4)
    load_pretrained(net, tmp_path / "r18.pth")
    torch.testing.assert_close(net.backbone.conv1.weight, source.conv1.weight)


def test_load_pretrained_refuses_missing_and_mismatched_files(tmp_path):
    net = create_model("resnet18", 4)
    with pytest.raises(CheckpointError, match="never downloads"):
        load_pretrained(net, tmp_path / "missing.pth")
    torch.save(create_model("resnet34", 4).backbone.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="right architecture"):
        load_pretrained(net, tmp_path / "r34.pth")
