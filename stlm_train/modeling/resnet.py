"""ResNet-18 trunk up to the stages STFPM compares (layer1..layer3 by default).

Key names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ...),
which timm's ``resnet18`` shares, so ImageNet weights load through a plain prefix map. The pooling
head (``avgpool``/``fc``) and stages after the last matched one never reach the map and are not built.
"""
from __future__ import annotations

import torch
from torch import nn

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2  # ResNet-18


class BasicBlock(nn.Module):
    """3x3-BN-ReLU-3x3-BN + (projected) shortcut, ReLU; the first block of a stage may downsample."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Features(nn.Module):
    """(B, 3, S, S) -> the outputs of ``layers`` (stage numbers 1..4; strides 4, 8, 16, 32).

    Args:
        layers: stages whose outputs are returned, in increasing order; stages after the last one are
            not built.
        generator: draws the initial weights (torchvision's init: Kaiming-normal fan-out convs, BatchNorm
            1/0); None uses the global RNG.
    """

    def __init__(self, layers: tuple[int, ...] = (1, 2, 3), generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.out_layers = tuple(sorted(layers))
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i in range(1, self.out_layers[-1] + 1):
            width, stride = STAGE_WIDTHS[i - 1], STAGE_STRIDES[i - 1]
            blocks = [BasicBlock(inplanes if b == 0 else width, width, stride if b == 0 else 1)
                      for b in range(BLOCKS_PER_STAGE)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            inplanes = width
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(STAGE_WIDTHS[i - 1] for i in self.out_layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, self.out_layers[-1] + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_layers:
                feats.append(x)
        return feats
