"""The attacker's decoders: from the shape of the sent tensor alone (the attack is black-box) back to an image. Any
tensor a cut sends is read as a feature map first (models.layouts); x2 stages then bring it to the image's side, the
last one resized to it where the side is not the map's times a power of two."""
import dataclasses
import math

import torch.nn.functional as F
from torch import nn

from ..utils import UsageError
from .layouts import layout_of

DECODERS = ('original', 'residual')
# The original work's decoder: (base width, extra convs a stage) per --decoder_depth; x2 by 'transpose' or 'bicubic'.
DECODER_DEPTHS = {'light': (16, 0), 'medium': (32, 1), 'deep': (64, 2)}
# The residual decoder: (width where the tensor arrives, residual blocks there) per --decoder_depth.
RESIDUAL_DEPTHS = {'light': (64, 0), 'medium': (128, 1), 'deep': (256, 2)}
INTERPOLATIONS = {'original': ('transpose', 'bicubic'), 'residual': ('transpose', 'pixelshuffle', 'bicubic')}
NORMS = ('none', 'group', 'batch')
MIN_WIDTH = 32  # the residual decoder halves its width at each x2 stage, down to this


def resolve(spec):
    """A config.DecoderSpec with the defaults that depend on its kind and depth filled in: the upsampling, and the
    residual decoder's width and blocks (the original decoder has neither)."""
    interpolation = spec.interpolation or INTERPOLATIONS[spec.kind][0]
    if spec.kind != 'residual':
        return dataclasses.replace(spec, interpolation=interpolation, width=None, blocks=None)
    width, blocks = RESIDUAL_DEPTHS[spec.depth]
    return dataclasses.replace(spec, interpolation=interpolation, width=spec.width or width,
                               blocks=blocks if spec.blocks is None else spec.blocks)


def check(spec):
    if spec.interpolation not in INTERPOLATIONS[spec.kind]:
        raise UsageError(f'--interpolation {spec.interpolation}: the {spec.kind} decoder upsamples by '
                         f'{" or ".join(INTERPOLATIONS[spec.kind])}')


def decoder_stages(stride):
    """The x2 stages from a map `stride` times smaller than the image up to it (or just past it)."""
    return max(0, math.ceil(math.log2(stride) - 1e-9))


def conv_bn_relu(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def upsampling_stage(c_in, c_out, interpolation, extra_convs):
    """x2 in resolution: a stride-2 transposed conv, or bicubic upsampling followed by a conv."""
    if interpolation == 'transpose':
        layers = [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                  nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    else:
        layers = [nn.Upsample(scale_factor=2, mode='bicubic', align_corners=False), *conv_bn_relu(c_in, c_out)]
    for _ in range(extra_convs):
        layers += conv_bn_relu(c_out, c_out)
    return nn.Sequential(*layers)


class StagedDecoder(nn.Module):
    """Intercepted tensor -> image in [0, 1]: read as a feature map (`layout`), through `stages`, resized to the
    image's side (`size`) where the stages do not reach it exactly, then `to_image`.

    Built from the shape of the intercepted tensor alone: the attack is black-box."""
    layout, size = None, None  # set by build_decoder

    def forward(self, features, activations=None):
        """`activations`, a list, collects each stage's output (for the sparsity penalty)."""
        x = features if self.layout is None else self.layout.to_map(features)
        for stage in self.stages:
            x = stage(x)
            if activations is not None:
                activations.append(x)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x.float(), size=(self.size, self.size), mode='bilinear',  # antialiasing: fp32 only
                              antialias=x.shape[-1] > self.size)
        return self.to_image(x)


class Decoder(StagedDecoder):
    """The original work's attacker: intercepted tensor (C, H, W) -> image in [0, 1], log2(stride) x2 stages."""

    def __init__(self, in_channels, stride, interpolation='transpose', depth='medium'):
        super().__init__()
        n_stages = decoder_stages(stride)
        base, extra_convs = DECODER_DEPTHS[depth]
        widths = [in_channels] + [min(512, base * 2 ** (n_stages - 1 - i)) for i in range(n_stages)]
        self.stages = nn.ModuleList(upsampling_stage(widths[i], widths[i + 1], interpolation, extra_convs)
                                    for i in range(n_stages))
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Sigmoid())


def norm_layer(kind, channels):
    if kind == 'group':
        return nn.GroupNorm(min(32, channels // 4), channels)  # independent of the batch size
    return nn.BatchNorm2d(channels) if kind == 'batch' else nn.Identity()


class ResidualBlock(nn.Module):
    """x + norm(conv(relu(norm(conv(x))))), the block of EDSR (which drops the norms) and ResNet."""

    def __init__(self, channels, norm):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm_layer(norm, channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1),
                                  norm_layer(norm, channels))

    def forward(self, x):
        return x + self.body(x)


def residual_upsampling(c_in, c_out, interpolation):
    """x2 in resolution: a conv to 4x the channels rearranged into space (pixel shuffle, ESPCN / EDSR), bicubic
    upsampling then a conv, or a stride-2 transposed conv."""
    if interpolation == 'pixelshuffle':
        return [nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2)]
    if interpolation == 'bicubic':
        return [nn.Upsample(scale_factor=2, mode='bicubic', align_corners=False), nn.Conv2d(c_in, c_out, 3, padding=1)]
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]


class ResidualDecoder(StagedDecoder):
    """This tool's attacker: residual blocks where the tensor arrives (where convolutions are cheap), then per x2
    stage an upsampling step and a residual block, the width halving towards the image.

    Stage 0 works at the arriving resolution; `stages` and `to_image` are what the figures hook."""

    def __init__(self, in_channels, stride, interpolation='transpose', width=128, blocks=1, norm='batch'):
        super().__init__()
        n_stages = decoder_stages(stride)
        widths = [max(MIN_WIDTH, width // 2 ** i) for i in range(n_stages + 1)]
        first = [nn.Conv2d(in_channels, widths[0], 3, padding=1), norm_layer(norm, widths[0]), nn.ReLU(inplace=True)]
        self.stages = nn.ModuleList([nn.Sequential(*first, *(ResidualBlock(widths[0], norm) for _ in range(blocks)))] + [
            nn.Sequential(*residual_upsampling(widths[i], widths[i + 1], interpolation), norm_layer(norm, widths[i + 1]),
                          nn.ReLU(inplace=True), ResidualBlock(widths[i + 1], norm)) for i in range(n_stages)])
        self.to_image = nn.Sequential(nn.Conv2d(widths[-1], 3, 3, padding=1), nn.Sigmoid())


def build_decoder(shape, image_size, spec):
    """The decoder `spec` (a config.DecoderSpec) describes, for a sent tensor of `shape` (no batch: any layout
    models.layouts reads) and square images of `image_size` pixels."""
    layout = layout_of(tuple(shape))
    if layout is None:
        raise UsageError(f'the decoder reads a feature map, a channels-last map, a token grid or a vector, not a '
                         f'tensor of shape {"x".join(map(str, shape))}')
    channels, height, _ = layout.map_shape(tuple(shape))
    spec, stride = resolve(spec), image_size / height
    if spec.kind == 'original':
        decoder = Decoder(channels, stride, spec.interpolation, spec.depth)
    else:
        decoder = ResidualDecoder(channels, stride, spec.interpolation, spec.width, spec.blocks, spec.norm)
    decoder.layout, decoder.size = (None if layout.kind == 'map' else layout), image_size
    return decoder
