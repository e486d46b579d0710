"""Optimisation beside the loop: parameter groups, the optimizer, the lr schedule, the seeds."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch

from edgekd.recipe import Recipe
from edgekd.train.precision import bitsandbytes_module

log = logging.getLogger(__name__)


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """Trainable parameters; a pretrained backbone's at lr × train.backbone_lr_factor, the head's at lr."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    factor = recipe.train.backbone_lr_factor
    if factor == 1.0 or not recipe.model.pretrained:
        return [{"params": [p for _, p in trainable]}]
    backbone = [p for name, p in trainable if ".backbone." in f".{name}"]
    rest = [p for name, p in trainable if ".backbone." not in f".{name}"]
    return [{"params": backbone, "lr": recipe.train.lr * factor}, {"params": rest}]


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    cfg = recipe.train
    if cfg.optimizer == "adam8bit":
        return bitsandbytes_module().optim.Adam8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, batches_per_epoch: int):
    """The lr schedule: StepLR steps once per epoch; warm-up and cosine step once per batch (a small
    dataset has only a handful of batches per epoch, too coarse for a smooth curve)."""
    cfg = recipe.train
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    warmup = round(cfg.warmup_epochs * batches_per_epoch)
    if cfg.scheduler == "none" and warmup == 0:
        return None
    if cfg.warmup_epochs >= cfg.epochs:
        log.warning("train.warmup_epochs (%g) >= train.epochs (%d): the lr never reaches its peak",
                    cfg.warmup_epochs, cfg.epochs)
    decay_steps = max(1, cfg.epochs * batches_per_epoch - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "none":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / decay_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

