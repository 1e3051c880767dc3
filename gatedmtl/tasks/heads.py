"""Task heads that accept any backbone output: a list of maps, one map, or a vector."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseHead", "ImageHead", "Features", "as_feature_list"]

Features = Union[Tensor, Sequence[Tensor]]


def as_feature_list(features: Features) -> list[Tensor]:
    """Normalise a backbone output to a list of tensors ([B,C,H,W] or [B,C])."""
    if isinstance(features, Tensor):
        return [features]
    if isinstance(features, (list, tuple)) and features and all(isinstance(f, Tensor) for f in features):
        return list(features)
    raise TypeError(f"expected a Tensor or a non-empty list of Tensors, got {type(features).__name__}")


class DenseHead(nn.Module):
    """Per-pixel head (HRNet style).

    All maps [B,C_i,H_i,W_i] are bilinearly upsampled to the finest one and concatenated,
    then conv1x1-BN-ReLU (``hidden_channels``, default ``min(sum C_i, 128)``), conv1x1 ->
    ``out_channels``, and bilinear upsampling to ``input_size`` (or to ``output_size`` given to
    :meth:`forward`). Output [B,out,H,W]. Pointwise, as HRNet's own head: a 3x3 fuse conv on the
    concatenated maps at the finest (often stride-2) resolution would cost several times the
    encoder.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        out_channels: int,
        input_size: tuple[int, int],
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if not feature_channels or min(feature_channels) <= 0:
            raise ValueError(f"feature_channels must be positive ints, got {feature_channels}")
        in_ch = sum(feature_channels)
        hidden = hidden_channels or min(in_ch, 128)
        self.feature_channels = feature_channels
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.fuse = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, features: Features, output_size: tuple[int, int] | None = None) -> Tensor:
        maps = as_feature_list(features)
        if any(m.dim() != 4 for m in maps):
            raise ValueError(f"a dense head needs [B,C,H,W] feature maps, got shapes {[tuple(m.shape) for m in maps]}")
        chans = [m.shape[1] for m in maps]
        if chans != self.feature_channels:
            raise ValueError(f"head built for channels {self.feature_channels}, got {chans}")
        finest = max(range(len(maps)), key=lambda i: maps[i].shape[-2] * maps[i].shape[-1])
        size = maps[finest].shape[-2:]
        up = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        x = up[0] if len(up) == 1 else torch.cat(up, dim=1)
        x = self.classifier(self.fuse(x))
        out = output_size or self.input_size
        if tuple(x.shape[-2:]) != tuple(out):
            x = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
        return x


class ImageHead(nn.Module):
    """Image-level head: global average pool of the last map (or the [B,C] vector) + Linear -> [B,out]."""

    def __init__(self, feature_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        feature_channels = [int(c) for c in feature_channels]
        if not feature_channels or min(feature_channels) <= 0:
            raise ValueError(f"feature_channels must be positive ints, got {feature_channels}")
        self.feature_channels = feature_channels
        self.fc = nn.Linear(feature_channels[-1], out_channels)

    def forward(self, features: Features) -> Tensor:
        x = as_feature_list(features)[-1]
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        elif x.dim() == 3:  # token sequence [B,N,C]
            x = x.mean(dim=1)
        elif x.dim() != 2:
            raise ValueError(f"an image head needs [B,C], [B,N,C] or [B,C,H,W], got {tuple(x.shape)}")
        if x.shape[1] != self.feature_channels[-1]:
            raise ValueError(f"head built for {self.feature_channels[-1]} channels, got {x.shape[1]}")
        return self.fc(x)
