"""The layout of the tensor a cut sends, whatever the architecture: a feature map (C, H, W), a channels-last map
(H, W, C: Swin), a token sequence (N, D: a vision transformer's, with or without its class token) or a vector (C:
after pooling); and the same tensor as a feature map (C, H, W), which the decoders and the figures read."""
import math
from typing import NamedTuple

import torch


def square_side(count):
    """The side of a square grid of `count` cells, or None."""
    side = math.isqrt(count)
    return side if side * side == count else None


# What each kind of layout is, in a sentence: "... sends a token sequence".
DESCRIPTIONS = {'map': 'a feature map', 'channels-last': 'a channels-last map', 'tokens': 'a token sequence',
                'vector': 'a vector'}


class Layout(NamedTuple):
    kind: str  # 'map' | 'channels-last' | 'tokens' | 'vector'
    class_token: bool = False  # tokens: the first one is a class token, not a cell of the grid

    def channels(self, shape):
        """The channels of a tensor of `shape` (no batch): what --keep_channels keeps; None for a vector."""
        return {'map': shape[0], 'channels-last': shape[-1], 'tokens': shape[-1]}.get(self.kind)

    def channel_axis(self):
        """The axis of the channels in a batch of such tensors."""
        return 1 if self.kind == 'map' else -1

    def map_shape(self, shape):
        """(C, H, W) of the feature map a tensor of `shape` (no batch) reads as."""
        if self.kind == 'map':
            return tuple(shape)
        if self.kind == 'channels-last':
            return shape[2], shape[0], shape[1]
        if self.kind == 'vector':
            return shape[0], 1, 1
        side = square_side(shape[0] - self.class_token)
        return shape[1] * (1 + self.class_token), side, side

    def to_map(self, z):
        """A batch of such tensors as feature maps (B, C, H, W): tokens on their grid, each cell beside the class
        token (so that no value sent is lost to the decoder); a vector as a 1x1 map."""
        if self.kind == 'map':
            return z
        if self.kind == 'channels-last':
            return z.permute(0, 3, 1, 2)
        if self.kind == 'vector':
            return z[:, :, None, None]
        cells = z[:, 1:] if self.class_token else z
        side = square_side(cells.shape[1])
        grid = cells.transpose(1, 2).reshape(len(z), -1, side, side)
        if not self.class_token:
            return grid
        return torch.cat([grid, z[:, 0, :, None, None].expand(-1, -1, side, side)], dim=1)


def layout_of(shape):
    """The Layout of a tensor of `shape` (no batch), or None where it is none of those the tool reads."""
    if len(shape) == 1:
        return Layout('vector')
    if len(shape) == 2:
        if square_side(shape[0]):
            return Layout('tokens')
        return Layout('tokens', class_token=True) if shape[0] > 1 and square_side(shape[0] - 1) else None
    if len(shape) == 3:
        if shape[1] == shape[2]:
            return Layout('map')
        return Layout('channels-last') if shape[0] == shape[1] else None
    return None
