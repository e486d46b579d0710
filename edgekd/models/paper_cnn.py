"""Seed 000's residual CNN family (Park & Kotla), in the form that reproduces all five parameter counts.

Block i (1..n) has 16·2^(i//2) output channels, so 12 blocks end at 1024 channels and 8 blocks at 256.
With the default classifiers (students: F → F/2 → classes; teacher: 1024 → 512 → 256 → classes) and 6
classes the counts are exactly the paper's: 12 blocks 26,534,358; 10: 6,601,686; 8: 1,648,470;
6: 408,854; 4: 98,294.
"""

from __future__ import annotations

from torch import Tensor, nn

from edgekd.models.registry import register_model


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection; a 1×1 projection when the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(c_out, c_out, 3, 1))
        self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def block_widths(blocks: int, width: int = 16) -> list[int]:
    return [width * 2 ** (i // 2) for i in range(1, blocks + 1)]


def block_strides(widths: list[int], width: int, downsample: int | None) -> list[int]:
    """Stride 2 where the width changes (the paper), for the first `downsample` changes only if given."""
    strides, halvings = [], 0
    for c_in, c_out in zip([width, *widths], widths):
        halve = c_in != c_out and (downsample is None or halvings < downsample)
        halvings += halve
        strides.append(2 if halve else 1)
    return strides


def _mlp_head(features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(features, size), nn.BatchNorm1d(size), nn.ReLU(inplace=True)]
        features = size
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class PaperCNN(nn.Module):
    def __init__(self, num_classes: int, blocks: int, classifier: list[int], width: int,
                 downsample: int | None = None, zero_init_residual: bool = False):
        super().__init__()
        widths = block_widths(blocks, width)
        strides = block_strides(widths, width, downsample)
        self.stem = nn.Sequential(*_conv_bn(3, width, 3, 1), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*(BasicBlock(c_in, c_out, stride)
                                      for c_in, c_out, stride in zip([width, *widths], widths, strides)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = _mlp_head(widths[-1], classifier, num_classes)
        if zero_init_residual:  # every block starts as its shortcut: a deep stack trains like a shallow one
            for block in self.blocks:
                nn.init.zeros_(block.body[-1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


@register_model
def paper_cnn(num_classes: int, blocks: int = 8, classifier: list[int] | None = None,
              width: int = 16, downsample: int | None = None, zero_init_residual: bool = False) -> PaperCNN:
    """Seed 000's residual CNN with `blocks` residual blocks.

    `classifier` lists the hidden sizes of the MLP head, by default [F/2] with F the last block's width
    (the students' head); the paper's teacher uses [512, 256]. The paper's printed classifier sizes do not
    reproduce its own parameter counts; these do.

    `downsample` caps how many width changes also halve the resolution (by default all of them, as in the
    paper: 12 blocks halve six times, so a 64 px input ends at 1×1). Parameters do not depend on it;
    compute does. `zero_init_residual` starts each block's last BatchNorm scale at zero (Goyal et al., 2017).
    """
    if not 1 <= blocks <= 16:
        raise ValueError(f"blocks={blocks}: paper_cnn needs 1..16 residual blocks (the paper uses 4-12)")
    if width < 1:
        raise ValueError(f"width={width} must be >= 1")
    if downsample is not None and downsample < 0:
        raise ValueError(f"downsample={downsample} must be >= 0 (or null for the paper's every width change)")
    if classifier is None:
        classifier = [block_widths(blocks, width)[-1] // 2]
    if any(size < 1 for size in classifier):
        raise ValueError(f"classifier={classifier}: hidden sizes must be >= 1")
    return PaperCNN(num_classes, blocks, list(classifier), width, downsample, zero_init_residual)
