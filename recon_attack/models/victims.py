"""The victim: a frozen torchvision classifier cut in two (models.cuts), with torchvision's weights, random ones from
a seed, a state-dict file, or a defended victim's file written by --train_defence."""
import os
import urllib.error

import torch
import torchvision
from torch import nn

from ..utils import UsageError
from .cuts import cut

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_TAG = 'IMAGENET1K_V1'  # torchvision's original ImageNet weights for every arch here
DEFENDED_FORMAT = 'recon-attack/defended-victim/1'


class SplitVictim(nn.Module):
    """The victim cut in two: `encoder` runs on the device, `tail` (the rest and the head) on the server.

    Always in eval mode, so its BatchNorm statistics never move, and frozen (no gradients to its weights) unless
    built with frozen=False, as defence training builds its own copy. `defended` is the record of a defended victim's
    file (defence_training.defended_record), None for a victim as torchvision ships it."""

    def __init__(self, encoder, tail, defended=None, frozen=True):
        super().__init__()
        self.encoder, self.tail, self.defended = encoder, tail, defended
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        return super().train(False)

    def encode(self, images):
        """[0, 1] images -> the intercepted tensor (the victim itself sees ImageNet-normalised input)."""
        return self.encoder((images - self.mean) / self.std)

    def classify(self, features):
        """Intercepted tensor -> the victim's logits."""
        return self.tail(features)

    def fingerprint(self):
        """A cheap checksum of the encoder's weights, stored with a decoder to catch a different victim."""
        return float(sum(p.double().abs().sum() for p in self.encoder.state_dict().values()
                         if p.is_floating_point()))


def victim_label(victim):
    """The weights of the victim a config.VictimConfig describes, as every table, figure and log names them."""
    if victim.pretrained:
        return 'ImageNet weights'
    if victim.weights:
        return f'weights {os.path.basename(victim.weights)}'
    return f'random-initialised, victim seed {victim.seed}'


def load_torchvision(arch, pretrained):
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None)
    weights = torchvision.models.get_model_weights(arch)[PRETRAINED_TAG]
    filename = os.path.basename(weights.url)
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (urllib.error.URLError, OSError) as e:
        cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UsageError(f'cannot download the ImageNet weights {filename} for {arch} ({e}); put the file in '
                         f'{cache}/ (torch hub cache, moved with TORCH_HOME) or pass --weights PATH') from None


def read_victim_weights(path, flag='--weights'):
    """A state dict file for the victim, or a defended victim's file (DEFENDED_FORMAT): (state dict, record or None).
    `flag`: the flag that named the file, for the one-line error."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UsageError(f'{flag} {path}: no such file') from None
    except Exception as e:
        raise UsageError(f'{flag} {path}: not a loadable state dict ({type(e).__name__})') from None
    if isinstance(state, dict) and state.get('format') == DEFENDED_FORMAT:
        return state['state_dict'], state
    return (state.get('state_dict', state) if isinstance(state, dict) else state), None


def defence_training_images(weights_path):
    """{name: content fingerprint} of the images a defended victim's file was fine-tuned on ({} for any other
    victim): never scored as held out against it."""
    record = read_victim_weights(weights_path)[1] if weights_path else None
    return (record or {}).get('data', {}).get('train', {})


def load_victim_weights(net, path, state, flag='--weights'):
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f'{flag} {path} does not fit {type(net).__name__}: {str(e).splitlines()[0]}') from None


def bottleneck(channels, narrow):
    """A learned narrow cut: a 1x1 conv to `narrow` channels on the device, one back to `channels` on the server."""
    return nn.Conv2d(channels, narrow, 1), nn.Conv2d(narrow, channels, 1)


def with_bottleneck(encoder, tail, squeeze, expand):
    return nn.Sequential(encoder, squeeze), nn.Sequential(expand, tail)


def check_defended(record, path, arch, split):
    if record['arch'] != arch or record['split'] != split:
        raise UsageError(f'--weights {path} is a {record["arch"]} defended at its {record["split"]} cut; pass '
                         f'--arch {record["arch"]} --split {record["split"]}')


def load_network(arch, pretrained=False, weights_path=None, seed=0, flag='--weights'):
    """The whole torchvision classifier: torchvision's weights (or random ones from `seed`), or a file named by
    `flag`; and the file's record where it is a defended victim (else None)."""
    state, record = read_victim_weights(weights_path, flag) if weights_path else (None, None)
    with torch.random.fork_rng(devices=[]):  # a random-initialised victim is a pure function of the seed
        torch.manual_seed(seed)
        net = load_torchvision(arch, pretrained and state is None)
    if state is not None:
        load_victim_weights(net, weights_path, state, flag)
    return net, record


def build_victim(arch, split, pretrained=False, weights_path=None, seed=0, flag='--weights'):
    """The victim cut at `split` (a defended victim's file with its bottleneck, if it has one)."""
    net, record = load_network(arch, pretrained, weights_path, seed, flag)
    encoder, tail = cut(net, arch, split)
    if record is not None:
        check_defended(record, weights_path, arch, split)
        if record['bottleneck'] is not None:
            squeeze, expand = bottleneck(record['bottleneck']['channels'], record['bottleneck']['narrow'])
            squeeze.load_state_dict(record['bottleneck']['squeeze'])
            expand.load_state_dict(record['bottleneck']['expand'])
            encoder, tail = with_bottleneck(encoder, tail, squeeze, expand)
        record = {k: v for k, v in record.items() if k not in ('state_dict', 'bottleneck')}
    return SplitVictim(encoder, tail, record)


@torch.no_grad()
def feature_shape(victim, image_size):
    """(C, H, W) of the intercepted tensor for square images of `image_size` pixels."""
    device = next(victim.parameters()).device
    return tuple(victim.encode(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])
