"""Model registry and builders; importing this package registers every built-in model."""

from edgekd.models import paper_cnn as _paper_cnn  # noqa: F401  (registers paper_cnn)
from edgekd.models import backbones as _backbones  # noqa: F401  (registers the pretrained-capable backbones)
from edgekd.models import resnet as _resnet  # noqa: F401  (registers resnet18, resnet34)
from edgekd.models.classifier import Classifier, freeze_backbone, set_train_mode
from edgekd.models.pretrained import load_pretrained, pretrained_normalisation, resolve_pretrained
from edgekd.models.registry import builder_params, check_model_args, create_model, model_names, register_model

__all__ = ["Classifier", "builder_params", "check_model_args", "create_model", "freeze_backbone",
           "load_pretrained", "model_names", "pretrained_normalisation", "resolve_pretrained", "register_model", "set_train_mode"]
