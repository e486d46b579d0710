"""Seed 001's models (Nguyen): torchvision ResNet-18/34 backbones with a Dropout + Linear head."""

from __future__ import annotations

from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet34 as tv_resnet34

from edgekd.models.backbones import BackboneClassifier, _torchvision
from edgekd.models.registry import register_model

ResNetClassifier = BackboneClassifier  # the name older code and checkpoints' docs use


@register_model
def resnet18(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """ResNet-18 (torchvision layout, weights from `model.pretrained` or random) with Dropout + Linear."""
    return _torchvision(tv_resnet18, num_classes, dropout)


@register_model
def resnet34(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """ResNet-34 (torchvision layout, weights from `model.pretrained` or random) with Dropout + Linear."""
    return _torchvision(tv_resnet34, num_classes, dropout)
