"""How much could leak: diagonal Fisher information leakage (dFIL; Maeng, Guo, Kariyappa & Suh, NeurIPS 2023), an
attacker-independent ceiling on what an unbiased attacker recovers from a sent tensor that carries Gaussian noise.

For the device's half f (from [0, 1] pixels, the victim's input normalisation included, to what it sends) and noise
N(0, sigma^2 I) on what it sends, the Fisher information the sent tensor carries about the image x is J^T J / sigma^2
(J: the Jacobian of f at x). dFIL(x) = tr(J^T J) / (d sigma^2) over the d pixel values, and by Cramer-Rao any
unbiased attacker's per-pixel MSE on x is at least 1 / dFIL(x): its PSNR on x at most 10 log10(dFIL(x)). An attacker
with a prior (a trained decoder, the optimisation's total-variation term) is biased and can beat it."""
import contextlib
import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .noise import generators_for, random_like, rademacher

DB = 10 / math.log(10)  # decibels per unit of natural logarithm
BIASED = ('it bounds unbiased attackers only: an attacker with a prior (a trained decoder, the optimisation\'s '
          'total-variation term) can beat it')
NO_NOISE = 'no bound: the tensor carries no noise'
CEILING_NOTE = ('unbiased ceiling: the PSNR no unbiased attacker can beat on those images (dFIL, Maeng et al. 2023), '
                'where the sent tensor carries Gaussian noise ("no bound" where it carries none); ' + BIASED)


def device_half(attack):
    """[0, 1] images -> the noise-free tensor the device sends, in fp32: the map whose Jacobian the bound needs.
    Channels a defence does not send are zeros in it, so they carry no information."""
    def send(images):
        features = attack.victim.encode(images)
        return features if attack.channel_mask is None else features * attack.channel_mask
    return send


@contextlib.contextmanager
def forward_mode_kernels():
    """Attention computed by kernels that have a forward mode: the plain arithmetic instead of the fused ones."""
    fused = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fused)


def jacobian_norms(half, images, tangents):
    """Per image: ||J v||^2 for its tangent v, one forward-mode product (the victim in eval mode, unchanged)."""
    with forward_mode_kernels():
        _, product = torch.func.jvp(half, (images,), (tangents,))
    return product.pow(2).flatten(1).sum(1)


def hutchinson_trace(half, images, probes, generators):
    """Per image: the unbiased estimate of tr(J^T J) as the mean of ||J v||^2 over `probes` random +-1 vectors v,
    and its standard error. `generators`: one per image, so an image's estimate does not depend on its batch."""
    samples = torch.stack([jacobian_norms(half, images, random_like(images, rademacher, generators))
                           for _ in range(probes)])
    return samples.mean(0), samples.std(0) / math.sqrt(probes)


def exact_trace(half, image, chunk=256):
    """tr(J^T J) of one image (C, H, W) exactly: ||J e_j||^2 summed over every pixel value j, one product each."""
    d = image.numel()
    total = torch.zeros((), dtype=torch.float64, device=image.device)
    for start in range(0, d, chunk):
        rows = torch.arange(start, min(start + chunk, d), device=image.device)
        basis = torch.zeros(len(rows), d, dtype=image.dtype, device=image.device)
        basis[torch.arange(len(rows)), rows] = 1
        copies = image.expand(len(rows), *image.shape).clone()  # each its own memory, as forward mode needs
        total += jacobian_norms(half, copies, basis.view(-1, *image.shape)).sum()
    return total


def leakage(trace, pixels, variance):
    """dFIL, the per-pixel MSE no unbiased attacker can beat, and the PSNR ceiling (dB) that MSE implies."""
    dfil = trace / (pixels * variance)
    return {'dfil': dfil, 'mse_bound': 1 / dfil, 'psnr_ceiling': DB * torch.log(dfil)}


def no_bound(attack, noise):
    """Why the tensor sent with test `noise` (a config.Noise or None) has no bound (None where it has one)."""
    if noise is None or noise.var == 0:
        return NO_NOISE
    if noise.at == 'features' and attack.on_tensor:
        names = ', '.join(d.defence.name for d in attack.on_tensor)
        return f'no bound: {names} acts on the noisy tensor, and the bound covers Gaussian noise alone'
    return None


class Bound:
    """Each scored image's bound, as one of `evaluate`'s measures: the Hutchinson estimate of tr(J^T J) over
    `probes` probes (seeded by the image's position among those scored) for noise on the tensor; for noise on the
    input, the device's half cannot add information to x + noise (data processing), so dFIL <= 1 / sigma^2 for
    every image. One Bound serves every attack on one set of scored images: each image's estimate is computed once.
    `noise`: the test noise (a config.Noise or None); `missing`: why the tensor has no bound (None where it has one)."""

    def __init__(self, attack, noise, probes):
        self.noise, self.probes, self.half = noise, probes, device_half(attack)
        self.missing = no_bound(attack, noise)
        self.known = {}  # position -> (trace, standard error)

    def __call__(self, images, sent, positions, recon=None):
        pixels = images[0].numel()
        if self.noise.at == 'input':
            trace, error = torch.full((len(images),), float(pixels), device=images.device), torch.zeros(len(images))
        else:
            trace, error = self.traces(images, positions)
        return {**leakage(trace, pixels, self.noise.var), 'psnr_ceiling_se': DB * error.to(trace) / trace}

    def traces(self, images, positions):
        """Hutchinson's estimate and its standard error for each image, computed for those not yet known."""
        new = [i for i, p in enumerate(positions) if p not in self.known]
        if new:
            trace, error = hutchinson_trace(self.half, images[new], self.probes,
                                            generators_for('bound probes', [positions[i] for i in new], images.device))
            self.known.update((positions[i], pair) for i, pair in zip(new, zip(trace, error)))
        trace, error = zip(*(self.known[p] for p in positions))
        return torch.stack(trace), torch.stack(error)

    def record(self):
        """What the eval json says of the bound (why there is none, where there is none)."""
        if self.missing:
            return self.missing
        how = ('data processing: the device\'s half adds no information to the noisy input' if self.noise.at == 'input'
               else f'Hutchinson estimate of tr(J^T J), {self.probes} probes an image')
        return {'what': 'dFIL (Maeng et al. 2023): per-pixel MSE >= 1 / dFIL, PSNR <= 10 log10(dFIL)',
                'noise': {'at': self.noise.at, 'variance': self.noise.var}, 'estimate': how, 'note': BIASED}

    def line(self, summary, per_image):
        """The log's line on the bound beside an attack's PSNR on the same images."""
        if self.missing:
            return self.missing
        margin = per_image['psnr'] - per_image['psnr_ceiling']
        return (f'unbiased-attacker ceiling (dFIL): PSNR <= {summary["psnr_ceiling"]["mean"]:.2f} dB (per-pixel MSE '
                f'>= {summary["mse_bound"]["mean"]:.4g}; standard error {summary["psnr_ceiling_se"]["mean"]:.2f} dB); '
                f'this attack is {margin.mean().item():+.2f} dB from it, above it on '
                f'{(margin > 0).float().mean().item():.0%} of the images: {BIASED}')


def calibrated_variance(attack, images, target_db, probes):
    """--noise_for_bound: the noise variance on the tensor at which the mean PSNR ceiling over `images` ([0, 1],
    training images) is `target_db`, and the record of the calibration. Closed form, as the ceiling falls by
    10 log10(sigma^2): sigma^2 = exp(mean_i ln(tr_i / d) - target / DB)."""
    probe_draws = generators_for('bound probes', range(len(images)), images.device)
    trace, _ = hutchinson_trace(device_half(attack), images, probes, probe_draws)
    variance = math.exp(torch.log(trace.double() / images[0].numel()).mean().item() - target_db / DB)
    return variance, {'target_db': target_db, 'variance': variance, 'sigma': math.sqrt(variance),
                      'images': len(images), 'probes': probes}
