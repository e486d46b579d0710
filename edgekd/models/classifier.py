"""The deployable unit: a network with its input normalisation inside, plus weight loading and freezing."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
