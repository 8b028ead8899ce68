"""Where each victim architecture is cut into the device's half (the encoder) and the server's (the tail): the cuts
a network can be split at, each one's name, and the default."""
from typing import NamedTuple

import torch
import torchvision
from torch import nn

from ..utils import UsageError

RESNET_SPLITS = {f'layer{i}': i for i in range(1, 5)}
# MobileNet cuts: name -> (features[0..N-1] kept, keep also the 1x1 expansion conv of features[N]).
MOBILENET_V2_SPLITS = {'block3': (4, False), 'block6': (7, False), 'block10': (11, False),
                       'block13': (14, False), 'block16': (17, False)}
MOBILENET_V3_SPLITS = {'block3': (4, False), 'block6': (7, False), 'block12': (13, False),
                       'block13_expand': (13, True), 'block15': (16, False)}
SPLITS = {'resnet18': RESNET_SPLITS, 'resnet34': RESNET_SPLITS, 'resnet50': RESNET_SPLITS,
          'mobilenet_v2': MOBILENET_V2_SPLITS, 'mobilenet_v3_large': MOBILENET_V3_SPLITS}
ARCHS = tuple(SPLITS)
# block13_expand is the original work's cut: 672 channels at stride 16.
DEFAULT_SPLIT = {'resnet18': 'layer2', 'resnet34': 'layer2', 'resnet50': 'layer2',
                 'mobilenet_v2': 'block6', 'mobilenet_v3_large': 'block13_expand'}


def cut(net, arch, split):
    """Split a torchvision classifier into (encoder, tail) at a named block boundary."""
    if arch.startswith('resnet'):
        k = RESNET_SPLITS[split]
        stem = [net.conv1, net.bn1, net.relu, net.maxpool]
        layers = [net.layer1, net.layer2, net.layer3, net.layer4]
        return (nn.Sequential(*stem, *layers[:k]),
                nn.Sequential(*layers[k:], net.avgpool, nn.Flatten(1), net.fc))
    n_blocks, with_expansion = SPLITS[arch][split]
    blocks = list(net.features)
    encoder, rest = blocks[:n_blocks], blocks[n_blocks:]
    if with_expansion:  # cut inside the next inverted residual, after its 1x1 expansion
        inner = list(rest[0].block)
        encoder.append(inner[0])
        rest = [nn.Sequential(*inner[1:])] + rest[1:]
    return nn.Sequential(*encoder), nn.Sequential(*rest, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), net.classifier)


def probe_feature_shape(arch, split, image_size):
    """(C, H, W) at the cut, found on the meta device: no weights, no compute, milliseconds (for flag checks)."""
    with torch.device('meta'):  # eval mode, as the victim runs: a 1x1 map cannot be batch-normalised in training mode
        encoder, _ = cut(torchvision.models.get_model(arch, weights=None).eval(), arch, split)
        return tuple(encoder(torch.zeros(1, 3, image_size, image_size)).shape[1:])


def nominal_stride(arch, split):
    """Image side / feature side at the cut, measured where every stride divides the image exactly."""
    return 256 // probe_feature_shape(arch, split, 256)[1]


def check_cut(arch, split, image_size):
    """An image size that cannot work with this cut, caught before anything is built."""
    stride = nominal_stride(arch, split)
    if image_size % stride:
        raise UsageError(f'--image_size {image_size}: {arch} cut at {split} has stride {stride}, so the image side must '
                         f'be a multiple of {stride} (e.g. {max(stride, image_size // stride * stride)})')


class Cut(NamedTuple):
    """A victim's cut as the flag checks name it: 'resnet18 cut at layer2', and the channels of its tensor."""
    name: str
    channels: int


def cut_at(arch, split, image_size):
    return Cut(f'{arch} cut at {split}', probe_feature_shape(arch, split, image_size)[0])
