"""Models people actually train: a BatchNorm ConvNet and the CIFAR ResNet-18.

The papers attack small Sigmoid networks at their random init (`lenet`,
`resnet20`).  Federated learning trains ReLU networks with BatchNorm; these two
are what the later attack papers and their benchmarks use:

- `ConvNet` (model "convnet"): the benchmark ConvNet of the gradient-inversion
  peers (breaching's and inverting-gradients' ``ConvNet``): eight blocks of
  conv3x3 (padding 1) - BatchNorm - ReLU with widths w, 2w, 2w, 4w, 4w, 4w,
  a 3x3 max-pool, 4w, 4w, another 3x3 max-pool, then one Linear layer.  For
  28x28 and 32x32 inputs the pools leave 3x3 maps (36w features, as there).
  The base width w defaults to 32 (breaching's default; the peers' papers
  also use 64).
- `ResNet18` (model "resnet18"): ResNet-18 as trained on CIFAR (3x3 stem
  convolution with stride 1 and no max-pool, four stages of two BasicBlocks
  with widths 64, 128, 256, 512 and strides 1, 2, 2, 2, a 1x1 projection
  shortcut where the shape changes, global average pooling, one Linear layer).
  ``width`` scales the stages (w, 2w, 4w, 8w; 64 is ResNet-18).

Both use ReLU and BatchNorm, so the gradient a client shares depends on its
batch through BatchNorm's statistics in training mode.  Their init is PyTorch's
default (weights and biases uniform in +-1/sqrt(fan_in), BatchNorm's scale 1 and
shift 0), drawn from an explicit generator so that equal seeds give equal
networks; building one leaves the global RNG where it was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gradleak.errors import ConfigError

CONVNET_WIDTH = 32
RESNET18_WIDTH = 64


def _conv_block(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


class ConvNet(nn.Module):
    """The peers' benchmark ConvNet with BatchNorm (8 conv blocks, 2 max-pools).

    Args:
        input_shape: ``(channels, height, width)``; height and width at least 9
            (each 3x3 max-pool divides them by three, rounding down).
        num_classes: Number of output logits.
        width: Base width w (the blocks have w, 2w, 2w, 4w, 4w, 4w, 4w, 4w channels).
        generator: Source of randomness for the init (explicit seeds).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        *,
        width: int = CONVNET_WIDTH,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels, height, size = input_shape
        if width < 1:
            raise ConfigError(f"the convnet's width must be 1 or more, got {width}")
        if min(height, size) < 9:
            raise ConfigError(
                f"the convnet needs images of at least 9x9 (two 3x3 max-pools), got {height}x{size}"
            )
        w = width
        with _own_rng():
            self.features = nn.Sequential(
                _conv_block(channels, w),
                _conv_block(w, 2 * w),
                _conv_block(2 * w, 2 * w),
                _conv_block(2 * w, 4 * w),
                _conv_block(4 * w, 4 * w),
                _conv_block(4 * w, 4 * w),
                nn.MaxPool2d(3),
                _conv_block(4 * w, 4 * w),
                _conv_block(4 * w, 4 * w),
                nn.MaxPool2d(3),
            )
            hidden = 4 * w * (height // 3 // 3) * (size // 3 // 3)
            self.fc = nn.Linear(hidden, num_classes)
        default_init_(self, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's two-convolution block with BatchNorm and ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), for any channels and classes.

    Args:
        input_shape: ``(channels, height, width)``; any size (global pooling).
        num_classes: Number of output logits.
        width: Channels of the stem and first stage (64 is ResNet-18).
        generator: Source of randomness for the init (explicit seeds).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        *,
        width: int = RESNET18_WIDTH,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"resnet18's width must be 1 or more, got {width}")
        with _own_rng():
            self.stem = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(width)
            self.act = nn.ReLU()
            stages: list[nn.Module] = []
            in_channels = width
            for stage, stride in enumerate((1, 2, 2, 2)):
                channels = width * 2**stage
                stages.append(
                    nn.Sequential(
                        BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)
                    )
                )
                in_channels = channels
            self.stages = nn.Sequential(*stages)
            self.fc = nn.Linear(in_channels, num_classes)
        default_init_(self, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.act(self.stem_bn(self.stem(x))))
        return self.fc(out.mean(dim=(2, 3)))


def _own_rng() -> contextlib.AbstractContextManager[None]:
    """Leave the global RNG as it was while PyTorch's layers draw their throwaway init.

    Every layer initialises itself from the global RNG when it is made; those
    values are overwritten from the caller's generator right after, so making
    a model should not move the global stream either.
    """
    return torch.random.fork_rng(devices=[])


@torch.no_grad()
def default_init_(model: nn.Module, *, generator: torch.Generator | None) -> nn.Module:
    """PyTorch's default init, drawn from `generator`, in place.

    Convolution and Linear weights and biases uniform in +-1/sqrt(fan_in)
    (what ``kaiming_uniform_(a=sqrt(5))`` and PyTorch's bias rule give);
    BatchNorm's scale 1 and shift 0, its running statistics reset.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            fan_in = module.weight[0].numel()
            bound = 1.0 / fan_in**0.5
            module.weight.uniform_(-bound, bound, generator=generator)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()
    return model


MLP_WIDTH = 1024


class MLP(nn.Module):
    """A two-layer perceptron on flattened images (model "mlp"): Linear(d, w) - ReLU - Linear.

    The simplest model federated tutorials train, and the one whose first layer a
    dishonest server can turn into a trap with the weights alone (`attacks/imprint.py`).
    ``width`` is the hidden layer's size (1,024 by default).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        *,
        width: int = MLP_WIDTH,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"the mlp's width must be 1 or more, got {width}")
        features = int(input_shape[0] * input_shape[1] * input_shape[2])
        with _own_rng():
            self.flatten = nn.Flatten()
            self.fc1 = nn.Linear(features, width)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(width, num_classes)
        default_init_(self, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(x))))
