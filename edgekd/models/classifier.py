"""The deployable unit: a network with its input normalisation inside, plus weight loading and freezing."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from edgekd.errors import CheckpointError


class Classifier(nn.Module):
    """Takes RGB pixels in [0, 255] (N, 3, H, W, any dtype) and returns class logits.

    Normalisation lives in the model so the exported graph carries it too: a device feeds the resized
    image and cannot get mean/std wrong.
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.net((pixels.to(self.mean.dtype) - self.mean) / self.std)


_SOURCE_HEADS = ("fc.", "classifier.", "head.")


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Load local backbone weights (a torchvision state dict); the head stays freshly initialised."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"pretrained weights {path} not found",
            hint="edgekd never downloads weights; fetch them once (torchvision's resnet34 file is "
                 "https://download.pytorch.org/models/resnet34-b627a593.pth) and set model.pretrained")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or damaged file
        raise CheckpointError(f"{path}: cannot read weights ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    target = getattr(net, "backbone", net)
    own = target.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in usable]
    # The file's own classifier (torchvision: fc.*) is replaced by our head; anything else unused means
    # the file is another architecture (a ResNet-34 file holds every ResNet-18 tensor name, and more).
    unused = [k for k in state if k not in own and not k.startswith(_SOURCE_HEADS)]
    if missing or unused:
        first = (missing or unused)[0]
        raise CheckpointError(f"{path}: {len(missing)} backbone tensors missing or of another shape, "
                              f"{len(unused)} tensors unused (first: {first}); is it the right architecture?")
    target.load_state_dict(usable)


def freeze_backbone(net: nn.Module) -> None:
    """Train only `net.head` (seed 001's teacher: a frozen pretrained ResNet-34 with a new head)."""
    for name, param in net.named_parameters():
        param.requires_grad = name.startswith("head.")


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """model.train(), but a frozen backbone keeps its BatchNorm statistics fixed too."""
    model.train()
    if frozen_backbone:
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and ".head." not in f".{name}.":
                module.eval()
