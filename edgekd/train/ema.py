"""An exponential moving average of a model's weights: the model that is validated, saved and exported."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """ema ← d·ema + (1 − d)·weights after every optimizer step; buffers (BatchNorm statistics) are copied.

    The decay is warmed up as min(decay, (1 + n) / (10 + n)) after n updates (timm's ModelEmaV2 idea):
    with a few hundred steps in a small run, a fixed 0.999 would still be mostly the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.updates = 0
        self._buffers = {name for name, _ in self.model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for (name, average), (_, current) in zip(self.model.state_dict().items(), model.state_dict().items()):
            if average.dtype.is_floating_point and name not in self._buffers:
                average.lerp_(current, 1 - decay)
            else:
                average.copy_(current)

