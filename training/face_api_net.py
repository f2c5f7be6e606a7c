"""face-api's expression network as a torch module, loadable with the package's weights.

:class:`FaceApiExpressionNet` is the network of ``@vladmandic/face-api@1.7.15``'s
``FaceExpressionNet`` (see :mod:`model_export.face_api` for where each part comes from in
the package's source): face-api's input normalisation, four densely connected blocks of
depthwise-separable 3×3 convolutions (3→32→64→128→256 channels, 112→7 pixels), a global
average pool and a 256→7 linear layer. It takes ``[N, 3, 112, 112]`` RGB pixels in 0–255
and, like the project's other emotion models, returns logits; the softmax over them is
face-api's output (in the class order of
:data:`model_export.face_api.FACE_API_EXPRESSION_LABELS`), and the exporter appends it.

:func:`build_face_api_expression_net` verifies the pinned tarball and loads its
dequantised weights, so the network can be fine-tuned from face-api's starting point.
The network has no batch norm or dropout, so ``train()`` and ``eval()`` compute the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import nn

from model_export.face_api import (
    DENSE_BLOCK_CHANNELS,
    FACE_API_EXPRESSION_LABELS,
    FEATURE_SIZE,
    INPUT_DIVISOR,
    MEAN_RGB,
    check_expression_weights,
    read_expression_weights,
)

Float32Array = npt.NDArray[np.float32]


class _FaceApiNormalisation(nn.Module):
    """face-api's ``normalize(x, meanRgb).div(255)`` on NCHW 0–255 RGB pixels."""

    mean: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        # Not persistent: it is a fixed part of the network, not a weight to save or tune.
        self.register_buffer("mean", torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / INPUT_DIVISOR


def _pad_same(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorFlow ``'same'`` padding for a 3×3 kernel (asymmetric at stride 2)."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    # At stride 2 on an even size TensorFlow adds one row/column at the bottom/right only;
    # torch's symmetric padding=1 would shift every output by half a pixel.
    height, width = x.shape[-2], x.shape[-1]
    pad_h = max((-(-height // stride) - 1) * stride + 3 - height, 0)
    pad_w = max((-(-width // stride) - 1) * stride + 3 - width, 0)
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class _SameConv3x3(nn.Module):
    """A plain 3×3 convolution with bias and TensorFlow ``'same'`` padding (``dense0/conv0``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_pad_same(x, self.stride))  # type: ignore[no-any-return]


class _SeparableConv(nn.Module):
    """``depthwiseSeparableConv``: depthwise 3×3 without bias, pointwise 1×1 with bias."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(_pad_same(x, self.stride)))  # type: ignore[no-any-return]


class _DenseBlock(nn.Module):
    """face-api's ``denseBlock4``: a strided conv0, then three separable convs on running sums."""

    def __init__(self, in_channels: int, out_channels: int, first: bool) -> None:
        super().__init__()
        self.conv0: nn.Module = (_SameConv3x3(in_channels, out_channels, 2) if first
                                 else _SeparableConv(in_channels, out_channels, 2))
        self.conv1 = _SeparableConv(out_channels, out_channels, 1)
        self.conv2 = _SeparableConv(out_channels, out_channels, 1)
        self.conv3 = _SeparableConv(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same nesting of the additions as face-api (a + (b + (c + d))), for float parity.
        out1 = torch.relu(self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(torch.relu(out1 + out2))
        out4 = self.conv3(torch.relu(out1 + (out2 + out3)))
        return torch.relu(out1 + (out2 + (out3 + out4)))


class FaceApiExpressionNet(nn.Module):
    """face-api's ``FaceExpressionNet`` for RGB ``[N, 3, 112, 112]`` pixels in 0–255; returns logits."""

    def __init__(self, num_classes: int = len(FACE_API_EXPRESSION_LABELS)) -> None:
        super().__init__()
        self.normalise = _FaceApiNormalisation()
        self.dense = nn.ModuleList(
            _DenseBlock(channels_in, channels_out, first=index == 0)
            for index, (channels_in, channels_out) in enumerate(DENSE_BLOCK_CHANNELS))
        self.fc = nn.Linear(FEATURE_SIZE, num_classes)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[N, 256]`` (face-api's bottleneck features)."""
        x: torch.Tensor = self.normalise(pixels)
        for block in self.dense:
            x = block(x)
        # tf.avgPool([7, 7], [2, 2], 'valid') on the 7×7 map of a 112×112 input is its mean.
        return x.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``; their softmax is face-api's expression probabilities."""
        return self.fc(self.embed(pixels))  # type: ignore[no-any-return]

    @torch.no_grad()
    def load_face_api_weights(self, weights: Mapping[str, Float32Array]) -> None:
        """Copy face-api's dequantised TFJS weights (HWIO / ``[in, out]`` layout) into the module."""
        check_expression_weights(weights)
        if self.fc.out_features != len(FACE_API_EXPRESSION_LABELS):
            raise ValueError("face-api's classifier has 7 outputs; this module was built with "
                             f"{self.fc.out_features}")

        def copy(target: torch.Tensor | None, value: npt.NDArray[np.float32]) -> None:
            if target is None:  # every layer of this module is built with its bias
                raise ValueError("missing bias parameter")
            source = torch.from_numpy(np.ascontiguousarray(value))
            if tuple(target.shape) != tuple(source.shape):
                raise ValueError(f"shape {tuple(source.shape)} does not fit parameter {tuple(target.shape)}")
            target.copy_(source)

        for index, block in enumerate(self.dense):
            for conv_index in range(4):
                prefix = f"dense{index}/conv{conv_index}"
                conv = getattr(block, f"conv{conv_index}")
                if isinstance(conv, _SameConv3x3):
                    copy(conv.conv.weight, weights[f"{prefix}/filters"].transpose(3, 2, 0, 1))
                    copy(conv.conv.bias, weights[f"{prefix}/bias"])
                else:
                    # depthwise [3, 3, C, 1] -> [C, 1, 3, 3]; pointwise [1, 1, C, out] -> [out, C, 1, 1]
                    copy(conv.depthwise.weight, weights[f"{prefix}/depthwise_filter"].transpose(2, 3, 0, 1))
                    copy(conv.pointwise.weight, weights[f"{prefix}/pointwise_filter"].transpose(3, 2, 0, 1))
                    copy(conv.pointwise.bias, weights[f"{prefix}/bias"])
        copy(self.fc.weight, weights["fc/weights"].T)  # TFJS matMul(x, W) with W [256, 7]
        copy(self.fc.bias, weights["fc/bias"])


def face_api_layout_weights(model: FaceApiExpressionNet) -> dict[str, Float32Array]:
    """The module's weights in face-api's TFJS names and layout (the inverse of ``load_face_api_weights``)."""
    weights: dict[str, Float32Array] = {}

    def array(tensor: torch.Tensor | None) -> Float32Array:
        if tensor is None:
            raise ValueError("missing bias parameter")
        return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)

    for index, block in enumerate(model.dense):
        for conv_index in range(4):
            prefix = f"dense{index}/conv{conv_index}"
            conv = getattr(block, f"conv{conv_index}")
            if isinstance(conv, _SameConv3x3):
                weights[f"{prefix}/filters"] = array(conv.conv.weight).transpose(2, 3, 1, 0)
                weights[f"{prefix}/bias"] = array(conv.conv.bias)
            else:
                weights[f"{prefix}/depthwise_filter"] = array(conv.depthwise.weight).transpose(2, 3, 0, 1)
                weights[f"{prefix}/pointwise_filter"] = array(conv.pointwise.weight).transpose(2, 3, 1, 0)
                weights[f"{prefix}/bias"] = array(conv.pointwise.bias)
    weights["fc/weights"] = np.ascontiguousarray(array(model.fc.weight).T)
    weights["fc/bias"] = array(model.fc.bias)
    return weights


def build_face_api_expression_net(tarball_bytes: bytes) -> FaceApiExpressionNet:
    """Verify the pinned ``@vladmandic/face-api`` tarball and return the network with its weights."""
    model = FaceApiExpressionNet()
    model.load_face_api_weights(read_expression_weights(tarball_bytes))
    return model.eval()
