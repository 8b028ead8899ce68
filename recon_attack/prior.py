"""The attacker's prior as the prior-aware (van Trees) bound needs it: the Fisher information of the image
distribution, J_P = E ||grad log p(x)||^2, estimated by denoising score matching on the attacker's training images.

Natural images are stored on a grid of 256 levels, so their own distribution has no finite Fisher information and
bounds no attacker; the bound is stated for images drawn from it smoothed by Gaussian noise of std s (the prior's
`sigma`). For that density the Fisher information per pixel is exactly (s^2 - mmse) / s^4, where mmse is the per-pixel
error of the best denoiser at noise s (Tweedie's formula: the score is (E[x | x + n] - (x + n)) / s^2). A trained
denoiser errs more than the best one, so its estimate is at most the true value, which is itself at most 1 / s^2:
both are recorded, and the bound is given at each (the second one guaranteed). The denoiser sees PATCH x PATCH
patches (its receptive field is 11 x 11 pixels), so the estimate is that of a prior over local image statistics:
again at most the true value."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .noise import generator
from .utils import progress, to_unit

STEPS, BATCH, WIDTH, PATCH = 300, 64, 16, 16  # of the denoiser: about 3 s on one CPU core


def denoiser():
    """A small residual CNN: (noisy image) -> the clean image."""
    layers = [nn.Conv2d(3, WIDTH, 3, padding=1)]
    for _ in range(3):
        layers += [nn.ReLU(), nn.Conv2d(WIDTH, WIDTH, 3, padding=1)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(WIDTH, 3, 3, padding=1))


def patches(images, chosen, draws, device):
    """A PATCH x PATCH patch of each chosen image (uint8), in [0, 1], at one random place for the batch."""
    size = images.shape[-1]
    top, left = (torch.randint(size - PATCH + 1, (2,), generator=draws) if size > PATCH else (0, 0))
    return to_unit(images[chosen][..., top:top + PATCH, left:left + PATCH].to(device))


def prior_fisher(images, sigma, seed, device, steps=STEPS):
    """The per-pixel Fisher information of the training images (uint8, N x 3 x S x S) smoothed by N(0, sigma^2): the
    denoising-score-matching estimate and the limit 1 / sigma^2, as a record. Seeded: the same images give the same
    estimate."""
    draws = generator('prior', seed)  # on the CPU: it picks images and places; noise is drawn there too
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = denoiser().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in progress(range(steps), desc='prior (denoising score matching)', unit='step'):
        clean = patches(images, torch.randint(len(images), (BATCH,), generator=draws), draws, device)
        noisy = clean + sigma * torch.randn(clean.shape, generator=draws).to(device)
        loss = F.mse_loss(noisy + model(noisy), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        errors = []
        for start in range(0, len(images), BATCH):
            clean = patches(images, torch.arange(start, min(start + BATCH, len(images))), draws, device)
            noisy = clean + sigma * torch.randn(clean.shape, generator=draws).to(device)
            errors.append((noisy + model(noisy) - clean).pow(2).flatten(1).mean(1))
        mse = torch.cat(errors).mean().item()
    limit = 1 / sigma ** 2
    return {'sigma': sigma, 'per_pixel': min(max((sigma ** 2 - mse) / sigma ** 4, 0.0), limit), 'limit': limit,
            'denoiser_mse': mse, 'images': len(images), 'steps': steps}
