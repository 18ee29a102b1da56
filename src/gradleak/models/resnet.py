"""CIFAR ResNets (He et al. 2016, section 4.2) made attackable the DLG way.

DLG changed ResNet-56 in two ways so the gradient can be differentiated again
and the attack sees enough signal: ReLU becomes Sigmoid (twice differentiable)
and strides are removed (every stage keeps the full 32x32 resolution).  Depth
6n+2: three stages of n basic blocks with 16, 32 and 64 channels, global
average pooling and one Linear layer, so iDLG's label rule applies (the pooled
features are post-Sigmoid, hence non-negative).

BatchNorm with a batch of one: the client computes its gradient in training
mode, where BatchNorm normalises each channel over the batch *and* the spatial
positions.  With one 32x32 image that is 1,024 values per channel, so the
statistics are well defined and nothing special is needed; the attacker
replays the same training-mode forward on its dummy input.  Running statistics
are not part of the gradient and do not matter to the attack.  `norm=False`
builds the network without BatchNorm, for experiments that want none.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, *, norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(channels) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(channels) if norm else nn.Identity()
        self.act = nn.Sigmoid()
        # Strides are gone, so only the channel count can change: a 1x1
        # projection shortcut where it does (option B of the ResNet paper).
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != channels:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 1, bias=not norm)]
            if norm:
                layers.append(nn.BatchNorm2d(channels))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A stride-free, Sigmoid CIFAR ResNet of depth 6n+2 (ResNet-20/32/56...).

    Args:
        depth: 6n+2, e.g. 20, 32, 56.
        input_shape: ``(channels, height, width)``; any spatial size works
            because of the global pooling.
        num_classes: Number of output logits.
        norm: Use BatchNorm (training-mode statistics) after every convolution.
        generator: Source of randomness for the init (explicit seeds).
    """

    def __init__(
        self,
        depth: int = 56,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 100,
        *,
        norm: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=not norm)
        self.stem_bn = nn.BatchNorm2d(16) if norm else nn.Identity()
        self.act = nn.Sigmoid()
        layers: list[nn.Module] = []
        in_channels = 16
        for channels in (16, 32, 64):
            for _ in range(blocks):
                layers.append(BasicBlock(in_channels, channels, norm=norm))
                in_channels = channels
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init_(self, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.act(self.stem_bn(self.stem(x))))
        return self.fc(out.mean(dim=(2, 3)))


@torch.no_grad()
def _kaiming_init_(model: nn.Module, *, generator: torch.Generator | None) -> None:
    # He-normal convolutions and a uniform Linear layer, drawn from `generator`
    # so that equal seeds give equal networks.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features**0.5
            module.weight.uniform_(-bound, bound, generator=generator)
            module.bias.uniform_(-bound, bound, generator=generator)
