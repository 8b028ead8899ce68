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
NO_NOISE = 'no bound: the tensor carries no noise'
SINGULAR = ('the Fisher information is singular (the tensor sends {sent} values for {pixels} pixel values): no '
            'unbiased attacker with finite error exists, so no unbiased ceiling applies; only the prior-aware bound '
            'does')
CEILING_NOTE = ('bounds, where the sent tensor carries Gaussian noise ("no bound" where it carries none): the unbiased '
                'ceiling (dFIL, Maeng et al. 2023) bounds the expected per-pixel MSE, over the noise, of unbiased '
                'attackers only, and is "singular" where the tensor has fewer values than the image (no unbiased '
                'attacker exists); every attack scored is biased (a prior, reconstructions clamped to [0, 1]), so '
                'it may lie above it. The prior-aware bound (van Trees) holds for every attacker, in expected MSE '
                'over the noise and the images, for images drawn from the training distribution smoothed by the '
                'prior\'s Gaussian (see the eval json\'s bound record); both compared with the attack\'s mean MSE '
                'over images (PSNR of the mean MSE)')


def centred_power(tensors):
    """The mean over a batch of sent tensors' elements of each element's variance across the images: the power of
    what the tensor says about its image (a constant added to it, which carries nothing, does not count)."""
    return tensors.flatten(1).var(0).mean()


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


def no_bound(noise):
    """Why the tensor sent with test `noise` (a config.Noise or None) has no bound (None where it has one). Defences
    that act on the noisy tensor (dropout, top-k, channel subsets) keep it: processing what was received cannot add
    Fisher information about the image."""
    return NO_NOISE if noise is None or noise.var == 0 else None


class Bound:
    """Each scored image's bound, as one of `evaluate`'s measures: the Hutchinson estimate of tr(J^T J) over
    `probes` probes (seeded by the image's position among those scored) for noise on the tensor; for noise on the
    input, the device's half cannot add information to x + noise (data processing), so dFIL <= 1 / sigma^2 for
    every image. One Bound serves every attack on one set of scored images: each image's estimate is computed once.
    `noise`: the test noise (a config.Noise or None); `prior`: the attacker's prior (prior.prior_fisher's record) for
    the prior-aware bound, None where it is not known; `missing`: why the tensor has no bound (None where it has
    one); `singular`: why no unbiased attacker exists (None where one may)."""

    def __init__(self, attack, noise, probes, prior=None):
        self.noise, self.probes, self.half, self.prior = noise, probes, device_half(attack), prior
        self.missing, self.singular, self.mask, self.checked = no_bound(noise), None, attack.channel_mask, False
        self.precision = attack.precision
        self.known = {}  # position -> (trace, standard error)

    def __call__(self, images, sent, positions, recon=None):
        pixels = images[0].numel()
        if self.noise.at == 'input':
            trace, error = torch.full((len(images),), float(pixels), device=images.device), torch.zeros(len(images))
        else:
            trace, error = self.traces(images, positions)
            if not self.checked:  # rank(J) <= values sent: fewer than the pixel values and J^T J is singular
                values, self.checked = self.values(images[:1]), True
                self.singular = SINGULAR.format(sent=values, pixels=pixels) if values < pixels else None
        return {**leakage(trace, pixels, self.noise.var), 'psnr_ceiling_se': DB * error.to(trace) / trace}

    @torch.no_grad()
    def values(self, image):
        """How many values the device sends for an image (a channel subset's zeros are not sent)."""
        sent = self.half(image)[0].numel()
        return sent if self.mask is None else round(sent * self.mask.mean().item())

    def traces(self, images, positions):
        """Hutchinson's estimate and its standard error for each image, computed for those not yet known."""
        new = [i for i, p in enumerate(positions) if p not in self.known]
        if new:
            trace, error = hutchinson_trace(self.half, images[new], self.probes,
                                            generators_for('bound probes', [positions[i] for i in new], images.device))
            self.known.update((positions[i], pair) for i, pair in zip(new, zip(trace, error)))
        trace, error = zip(*(self.known[p] for p in positions))
        return torch.stack(trace), torch.stack(error)

    def prior_aware(self, summary):
        """The van Trees bound on the expected per-pixel MSE over the noise and the images: 1 / (E[dFIL] + J_P),
        J_P the prior's per-pixel Fisher information (its estimate, and its guaranteed limit 1 / sigma^2); None where
        the prior is not known."""
        if self.prior is None:
            return None
        dfil = summary['dfil']['mean']
        return {'what': 'van Trees: E[per-pixel MSE] >= 1 / (E[dFIL] + J_P) for every attacker, over the noise and '
                        f'images drawn from the training distribution smoothed by N(0, {self.prior["sigma"]:g}^2)',
                'psnr': DB * math.log(dfil + self.prior['per_pixel']), 'mse': 1 / (dfil + self.prior['per_pixel']),
                'psnr_guaranteed': DB * math.log(dfil + self.prior['limit']), 'prior': self.prior,
                'note': 'J_P estimated by denoising score matching, which errs low, so the bound at the estimate may '
                        'be too high; at the limit J_P <= 1 / sigma^2 it is guaranteed'}

    def record(self, summary):
        """What the eval json says of the bounds (why there is none, where there is none)."""
        if self.missing:
            return self.missing
        how = ('data processing: the device\'s half adds no information to the noisy input' if self.noise.at == 'input'
               else f'Hutchinson estimate of tr(J^T J), {self.probes} probes an image, in fp32 on the noise-free '
                    f'device half (the scored tensor ran in {self.precision})')
        return {'what': 'dFIL (Maeng et al. 2023): an unbiased attacker\'s expected per-pixel MSE over the noise >= '
                        '1 / dFIL; PSNR <= 10 log10(dFIL)',
                'noise': {'at': self.noise.at, 'variance': self.noise.var}, 'estimate': how,
                'unbiased': self.singular or 'bounds unbiased attackers only; every attack scored is biased',
                'prior_aware': self.prior_aware(summary)}

    def line(self, summary, per_image):
        """The log's lines on the bounds beside an attack's mean per-pixel MSE on the same images."""
        if self.missing:
            return self.missing
        mse = summary['mse']['mean']
        attack = f'this attack: mean per-pixel MSE {mse:.4g} (PSNR {-DB * math.log(mse):.2f} dB)'
        unbiased = self.singular or (
            f'unbiased-attacker bound (dFIL): mean expected per-pixel MSE >= {summary["mse_bound"]["mean"]:.4g} '
            f'(mean per-image ceiling {summary["psnr_ceiling"]["mean"]:.2f} dB, standard error '
            f'{summary["psnr_ceiling_se"]["mean"]:.2f} dB); it bounds unbiased attackers only')
        bayes = self.prior_aware(summary)
        prior = ('prior-aware bound left out: the attacker\'s prior is not known here' if bayes is None else
                 f'prior-aware bound (van Trees, prior smoothed by sigma {self.prior["sigma"]:g}): expected per-pixel '
                 f'MSE >= {bayes["mse"]:.4g}, PSNR <= {bayes["psnr"]:.2f} dB at the prior\'s estimated Fisher '
                 f'information, <= {bayes["psnr_guaranteed"]:.2f} dB guaranteed')
        return f'{unbiased}\n{prior}\n{attack}'


def calibrated_variance(attack, images, target_db, probes, quantile=None):
    """--noise_for_bound: the noise variance on the tensor at which the unbiased ceiling on `images` ([0, 1],
    calibration images from the training set) is `target_db`: the mean of their per-image ceilings (dB), or with
    `quantile` q, the ceiling a share q of them stay at or below. Closed form, as each ceiling falls by
    10 log10(sigma^2): sigma^2 = exp(mean_i ln(tr_i / d) - target / DB), or the q-quantile of tr_i / d times
    exp(-target / DB). Returns the variance and the record of the calibration."""
    probe_draws = generators_for('bound probes', range(len(images)), images.device)
    trace, _ = hutchinson_trace(device_half(attack), images, probes, probe_draws)
    per_pixel = trace.double() / images[0].numel()
    level = per_pixel.log().mean() if quantile is None else torch.quantile(per_pixel, quantile).log()
    variance = math.exp(level.item() - target_db / DB)
    return variance, {'target_db': target_db, 'variance': variance, 'sigma': math.sqrt(variance),
                      'images': len(images), 'probes': probes,
                      'meaning': (f'the mean unbiased ceiling over {len(images)} calibration images' if quantile is None
                                  else f'a share {quantile:g} of {len(images)} calibration images have an unbiased '
                                       'ceiling at or below it')}


def snr_variance(attack, images, snr_db):
    """--noise_snr: the noise variance on the tensor at `snr_db` below its centred power on `images` ([0, 1],
    calibration images from the training set), and the record of it. A defended victim measured this way meets
    noise scaled to what it sends, so no shift or scale of its tensor changes what the noise hides."""
    power = centred_power(device_half(attack)(images).detach().double()).item()
    variance = power * 10 ** (-snr_db / 10)
    return variance, {'snr_db': snr_db, 'power': power, 'variance': variance, 'sigma': math.sqrt(variance),
                      'images': len(images), 'meaning': f'{snr_db:g} dB below the tensor\'s centred power on '
                                                        f'{len(images)} calibration images'}


def fisher_ceilings(half, images, power, probes, first=0):
    """Per image ([0, 1]; `first`: the position of images[0] among those measured, which seeds its probes): the
    unbiased ceiling (dB) at noise of variance `power` on the tensor `half` sends; with the tensor's own centred power
    it is the ceiling at 0 dB SNR (a defence cannot game it by shifting or scaling its tensor), with another
    victim's, the ceiling at that fixed absolute noise."""
    positions = range(first, first + len(images))
    trace, _ = hutchinson_trace(half, images, probes, generators_for('bound probes', positions, images.device))
    return leakage(trace, images[0].numel(), power)['psnr_ceiling']
