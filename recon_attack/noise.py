"""Random draws on the device's side (Gaussian noise, dropout masks) and of the bound's probes, each from its own
stream: a stream's seeds are hashed from its name and the position of the draw (seed, epoch, image), so no two
streams ever share a seed (the first training batch of an epoch never sees a held-out image's test noise), and an
image's draws do not depend on the batch it is in.

The streams (docs/sweeps-and-reports.md, "Random streams"):
- 'test noise' / 'test masks' (image position): what the device adds to each scored image, the same for every
  attack, seed and figure;
- 'training noise' / 'training masks' (attacker seed, epoch, process): the attacker's training images;
- 'data order' (attacker seed, epoch) and 'augment' (attacker seed, epoch, step, process): the attacker's batches;
- 'bound probes' (image position): the Hutchinson probes of the bound;
- 'prior' (attacker seed): the prior-aware bound's denoiser (its patches and noise);
- 'channel subset' (victim seed): --channel_select random, a property of the defence, not of the attacker;
- the attacker's initial weights: torch.manual_seed(attacker seed)."""
import hashlib
import math
from typing import NamedTuple

import torch


def stream_seed(stream, *position):
    """The seed of one draw of a named stream: a hash of the stream's name and the draw's position."""
    text = ' '.join(map(str, (stream, *position)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), 'big')


def generator(stream, *position, device='cpu'):
    return torch.Generator(device=device).manual_seed(stream_seed(stream, *position))


def generators_for(stream, positions, device='cpu'):
    """One generator of `stream` per image, seeded by its position among the images scored."""
    return [generator(stream, int(p), device=device) for p in positions]


class Draws(NamedTuple):
    """Where the device's random draws come from: its Gaussian noise and its random defences' masks, two streams,
    each one generator or a list of one per image (see random_like)."""
    noise: object
    masks: object


def held_out_draws(positions, device):
    """Each scored image's own draws, by its position: the same tensor for every attack and figure of the images."""
    return Draws(generators_for('test noise', positions, device), generators_for('test masks', positions, device))


def training_draws(seed, epoch, rank, device):
    """The attacker's training images' draws in one epoch (of one process): a stream per attacker seed and epoch."""
    return Draws(generator('training noise', seed, epoch, rank, device=device),
                 generator('training masks', seed, epoch, rank, device=device))


def noise_line(noise):
    """Where the device's Gaussian noise goes and when (a config.NoiseConfig), as the log says it; None without."""
    where = 'the input image' if noise.at == 'input' else 'the sent tensor'
    other = '--noise_at features puts it on the sent tensor' if noise.at == 'input' else 'a defence'
    parts = ([f'variance {noise.var:g} (mean {noise.mean:g}) while the attacker trains'] if noise.train else []) + (
        [f'variance {noise.test_var:g} (mean {noise.test_mean:g}) when it is measured'] if noise.test else [])
    return f'noise on {where} ({other}): ' + ', '.join(parts) if parts else None


def random_like(x, draw, generator):
    """`draw` (torch.rand, torch.randn or rademacher) of x's shape from one generator, or, given a list of generators
    (one per image), each image's from its own."""
    if isinstance(generator, list):
        return torch.stack([draw(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])
    return draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rademacher(shape, generator=None, device=None, dtype=None):
    """Random +-1 entries: the probe vectors of Hutchinson's estimator (the lowest variance of any i.i.d. choice)."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def add_noise(x, noise, generator):
    """x plus Gaussian `noise` (a config.Noise); `generator`: one, or a list of one per image (see random_like)."""
    return x + noise.mean + math.sqrt(noise.var) * random_like(x, torch.randn, generator)
