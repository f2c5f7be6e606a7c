"""Emotion classifiers for grey face crops: mini-Xception and a residual CNN.

Both take ``[N, 1, S, S]`` grey pixel values in 0–255 (the runtime's input, see
:class:`workers.runners.EmotionRunner`) and fold the normalisation into the network, so
the exported ONNX model needs no preprocessing beyond cropping, greying and resizing.
Both return logits over the seven FER2013 classes; the exporter appends the softmax.

* ``mini-xception``: Arriaga, Valdenegro-Toro and Plöger (2017), "Real-time
  Convolutional Neural Networks for Emotion and Gender Classification" — the network
  of the default model: two plain 3×3 convolutions with 8 filters (valid padding), then
  four modules of two depthwise-separable 3×3 convolutions (16, 32, 64, 128 filters)
  with batch norm, a 3×3 stride-2 max pool and a strided 1×1 convolution shortcut, then
  a 3×3 convolution to the class count and global average pooling. About 60 k parameters.
  The original normalises pixels to [-1, 1]; so does this one.
* ``resnet``: a ResNet-18-like network written for small grey inputs: a 3×3 stem
  without the ImageNet 7×7/max-pool downsampling (64×64 faces are already small), four
  stages of two basic residual blocks (widths ``width·{1,2,4,8}``, strides 1,2,2,2),
  global average pooling, dropout and a linear classifier. ``width=64`` is ResNet-18's
  size (about 11 M parameters); the default 32 trains 4× faster on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from kernel.types import EMOTION_LABELS

EMOTION_MODEL_FAMILIES: tuple[str, ...] = ("mini-xception", "resnet", "face-api")
"""Model families ``classlens train emotion --model`` accepts."""

MODEL_FACTORY = "training.emotion_models:build_emotion_model"
"""Dotted path of :func:`build_emotion_model`, recorded in ``run.json``."""


class _PixelNormalisation(nn.Module):
    """0–255 pixel values → [-1, 1], as mini-Xception's original preprocessing does."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels / 127.5 - 1.0


class _SeparableConv(nn.Module):
    """Keras ``SeparableConv2D``: a depthwise 3×3 then a pointwise 1×1, both without bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))  # type: ignore[no-any-return]


class _XceptionModule(nn.Module):
    """Two separable convolutions and a max pool, added to a strided 1×1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False), nn.BatchNorm2d(out_channels))
        self.body = nn.Sequential(
            _SeparableConv(in_channels, out_channels), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            _SeparableConv(out_channels, out_channels), nn.BatchNorm2d(out_channels),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)  # type: ignore[no-any-return]


class MiniXception(nn.Module):
    """mini-Xception (Arriaga et al. 2017) for grey 0–255 input; returns logits."""

    def __init__(self, num_classes: int = len(EMOTION_LABELS), widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _PixelNormalisation(),
            nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        ]
        channels = 8
        for width in widths:
            layers.append(_XceptionModule(channels, width))
            channels = width
        layers += [nn.Conv2d(channels, num_classes, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.network = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for pixels ``[N, 1, S, S]`` in 0–255."""
        return self.network(pixels)  # type: ignore[no-any-return]


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with a (projected when needed) identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.shortcut(x))  # type: ignore[no-any-return]


class ResidualCNN(nn.Module):
    """ResNet-18-like classifier for small grey faces (0–255 input); returns logits."""

    def __init__(self, num_classes: int = len(EMOTION_LABELS), width: int = 32, blocks: int = 2,
                 dropout: float = 0.3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            _PixelNormalisation(),
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        ]
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            for index in range(blocks):
                layers.append(_BasicBlock(channels, out_channels, stride if index == 0 else 1))
                channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_size = channels
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, feature_size]`` (used to initialise engagement models from emotion)."""
        return self.features(pixels)  # type: ignore[no-any-return]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for pixels ``[N, 1, S, S]`` in 0–255."""
        return self.classifier(self.embed(pixels))  # type: ignore[no-any-return]


def build_emotion_model(family: str, num_classes: int = len(EMOTION_LABELS), **options: int | float) -> nn.Module:
    """A fresh emotion model of a family in :data:`EMOTION_MODEL_FAMILIES`."""
    if family == "mini-xception":
        return MiniXception(num_classes)
    if family == "resnet":
        return ResidualCNN(num_classes, width=int(options.get("width", 32)), blocks=int(options.get("blocks", 2)),
                           dropout=float(options.get("dropout", 0.3)))
    if family == "face-api":
        return FaceApiEmotionNet(num_classes, frozen_blocks=int(options.get("frozen_blocks", 3)),
                                 dropout=float(options.get("dropout", 0.2)))
    raise ValueError(f"unknown emotion model {family!r}; choose one of {', '.join(EMOTION_MODEL_FAMILIES)}")


class FaceApiEmotionNet(nn.Module):
    """face-api's expression network, fine-tuned from its own weights on grey faces; returns logits.

    Input ``[N, 1, 112, 112]`` grey pixels 0–255 (repeated to face-api's three channels
    inside, since FER+ and CK+ are grey). Output in the product's class order. The first
    ``frozen_blocks`` dense blocks keep face-api's weights: on a two-core CPU that is what
    makes fine-tuning affordable, because their output can be computed once per face
    (:meth:`prefix`) and only the rest (:meth:`head`) is trained. With ``from_features``
    set, :meth:`forward` takes those precomputed prefix features instead of pixels.
    """

    def __init__(self, num_classes: int = len(EMOTION_LABELS), frozen_blocks: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        from training.face_api_net import FaceApiExpressionNet

        if not 0 <= frozen_blocks <= 4:
            raise ValueError(f"frozen_blocks is 0 to 4, got {frozen_blocks}")
        self.network = FaceApiExpressionNet(num_classes)
        self.frozen_blocks = frozen_blocks
        self.dropout = nn.Dropout(dropout)
        self.from_features = False

    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """Output of the frozen blocks for grey pixels ``[N, 1, 112, 112]``."""
        x: torch.Tensor = self.network.normalise(pixels.expand(-1, 3, -1, -1))
        for block in self.network.dense[: self.frozen_blocks]:
            x = block(x)
        return x

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen blocks' output."""
        x = features
        for block in self.network.dense[self.frozen_blocks:]:
            x = block(x)
        return self.network.fc(self.dropout(x.mean(dim=(2, 3))))  # type: ignore[no-any-return]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for pixels, or for prefix features when ``from_features`` is set."""
        return self.head(inputs if self.from_features else self.prefix(inputs))

    def load_pretrained(self, tarball_bytes: bytes) -> None:
        """Load face-api's weights (classifier rows in the product's order) and freeze the prefix."""
        from model_export.face_api import product_order
        from training.face_api_net import FaceApiExpressionNet, build_face_api_expression_net

        pretrained: FaceApiExpressionNet = build_face_api_expression_net(tarball_bytes)
        order = torch.tensor(product_order())
        with torch.no_grad():
            state = pretrained.state_dict()
            state["fc.weight"] = state["fc.weight"][order]
            state["fc.bias"] = state["fc.bias"][order]
            self.network.load_state_dict(state)
        for block in self.network.dense[: self.frozen_blocks]:
            block.requires_grad_(False)
