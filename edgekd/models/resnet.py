"""Seed 001's models (Nguyen): torchvision ResNet-18/34 backbones with a Dropout + Linear head."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet34 as tv_resnet34

from edgekd.models.registry import register_model


class ResNetClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _check_dropout(dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")


@register_model
def resnet18(num_classes: int, dropout: float = 0.2) -> ResNetClassifier:
    """ResNet-18 (torchvision layout, weights from `model.pretrained` or random) with Dropout + Linear."""
    _check_dropout(dropout)
    return ResNetClassifier(tv_resnet18(weights=None), num_classes, dropout)


@register_model
def resnet34(num_classes: int, dropout: float = 0.2) -> ResNetClassifier:
    """ResNet-34 (torchvision layout, weights from `model.pretrained` or random) with Dropout + Linear."""
    _check_dropout(dropout)
    return ResNetClassifier(tv_resnet34(weights=None), num_classes, dropout)
