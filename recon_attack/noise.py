"""Random draws on the device's side (Gaussian noise, dropout masks) and of the bound's probes: from one generator, or
one generator per image, so that an image's draws do not depend on the batch it is in."""
import math

import torch


def generators_for(positions, device='cpu'):
    """One generator per image, seeded by its position among the images scored."""
    return [torch.Generator(device=device).manual_seed(int(p)) for p in positions]


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
