"""Parameters and multiply-accumulates of a model at an input size, counted on the meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgekd.models.registry import create_model


@dataclass
class ModelStats:
    parameters: int
    macs: int  # multiply-accumulates of one image through convolutions and linear layers


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int) -> int:
    """MACs for one (3, S, S) image: Conv2d and Linear layers, which hold all but a sliver of the work."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output[0].numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output) -> None:
        nonlocal total
        total += output[0].numel() * module.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def model_stats(name: str, num_classes: int, args: dict, image_size: int) -> ModelStats:
    with torch.device("meta"):
        model = create_model(name, num_classes, **args)
    return ModelStats(count_parameters(model), count_macs(model, image_size))


def recipe_model_stats(recipe) -> dict:
    """One row of `edgekd summary`: the recipe's model at its input size."""
    from edgekd.data import dataset_class_names

    classes = recipe.data.classes or dataset_class_names(recipe.data)
    stats = model_stats(recipe.model.name, len(classes), recipe.model.args, recipe.data.image_size)
    return {"recipe": recipe.name, "model": recipe.model.name, "args": recipe.model.args,
            "classes": len(classes), "image_size": recipe.data.image_size,
            "parameters": stats.parameters, "macs": stats.macs}
