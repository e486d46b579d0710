"""A registry of model builders: small typed functions, looked up by name.

A builder takes `num_classes` and keyword arguments with type hints and defaults; those hints are what
recipes are validated against, so a builder's signature is its schema.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

import torch
from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = builder
    return builder


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}") from None


def builder_params(name: str) -> dict[str, Any]:
    """The builder's keyword arguments (except num_classes) and their type hints."""
    builder = _builder(name)
    hints = typing.get_type_hints(builder)
    params = inspect.signature(builder).parameters
    return {p: hints.get(p, Any) for p in params if p != "num_classes"}


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return _builder(name)(num_classes=num_classes, **kwargs)


def check_model_args(name: str, num_classes: int, args: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory, no compute) so bad arguments fail early."""
    with torch.device("meta"):
        create_model(name, num_classes, **args)
