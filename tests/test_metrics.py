import math

import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim
from scipy.signal import convolve2d

from recon_attack.metrics import (MIN_MSE, MSSSIM_WEIGHTS, ms_ssim_per_image, msssim_scales, psnr, score,
                                  victim_agreement)


def test_psnr_of_identical_images_is_capped():
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(psnr(x, x), torch.full((3,), 10 * math.log10(1 / MIN_MSE)))


def test_psnr_of_a_known_constant_error():
    x = torch.full((2, 3, 32, 32), 0.5)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0), atol=1e-4)  # MSE 0.01 -> 20 dB


def test_psnr_is_per_image_not_from_the_batch_mean_mse():
    x = torch.zeros(2, 3, 16, 16)
    y = torch.stack([torch.full((3, 16, 16), 0.1), torch.full((3, 16, 16), 0.01)])
    per_image = psnr(x, y)
    assert torch.allclose(per_image, torch.tensor([20.0, 40.0]), atol=1e-3)
    assert per_image.mean().item() == pytest.approx(30.0, abs=1e-3)  # not 10 log10(1 / 0.00505) = 22.97


def test_ssim_and_msssim_of_identical_images_are_one():
    x = torch.rand(2, 3, 64, 64)
    metrics = score(x, x)
    assert torch.allclose(metrics['ssim'], torch.ones(2), atol=1e-5)
    assert torch.allclose(metrics['ms_ssim'], torch.ones(2), atol=1e-5)
    assert torch.all(metrics['mse'] == 0)


def test_ssim_drops_with_noise():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    assert torch.all(score((x + 0.2 * torch.randn_like(x)).clamp(0, 1), x)['ssim'] < 0.9)


@pytest.mark.parametrize('size,scales', [(16, 1), (32, 2), (64, 3), (160, 4), (161, 5), (320, 5)])
def test_msssim_uses_the_scales_that_fit(size, scales):
    assert msssim_scales(size) == scales


def test_reduced_scale_loop_matches_pytorch_msssim_at_five_scales():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 176, 176)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours = ms_ssim_per_image(x, y, scales=5)
    reference = ms_ssim(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ms_ssim_per_image(x, y), reference)


def reference_ms_ssim(x, y, scales):
    """MS-SSIM (Wang et al. 2003) of two [0, 1] images (C, H, W) in float64 numpy: an 11-tap Gaussian window of
    sigma 1.5 (valid positions only), contrast-structure at every scale but the last, luminance too at the last,
    2x2 average pooling between scales, the standard weights of the scales used renormalised; mean over channels."""
    taps = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(taps, taps) / np.outer(taps, taps).sum()
    blur = lambda a: convolve2d(a, window, mode='valid')  # noqa: E731
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    weights = np.array(MSSSIM_WEIGHTS[:scales]) / sum(MSSSIM_WEIGHTS[:scales])
    values = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        value = 1.0
        for level in range(scales):
            mu_a, mu_b = blur(a), blur(b)
            var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
            cs = (2 * cov + c2) / (var_a + var_b + c2)
            if level == scales - 1:
                value *= np.mean((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs) ** weights[level]
            else:
                value *= max(np.mean(cs), 0) ** weights[level]
                a, b = [t.reshape(t.shape[0] // 2, 2, t.shape[1] // 2, 2).mean((1, 3)) for t in (a, b)]
        values.append(value)
    return np.mean(values)


@pytest.mark.parametrize('size', [32, 64, 128])
def test_reduced_scale_msssim_matches_an_independent_computation(size):
    torch.manual_seed(size)
    x = torch.rand(2, 3, size, size)
    y = (x + 0.15 * torch.randn_like(x)).clamp(0, 1)
    ours = ms_ssim_per_image(x, y)
    for i in range(2):
        assert ours[i].item() == pytest.approx(reference_ms_ssim(x[i], y[i], msssim_scales(size)), abs=2e-4)


def test_agreement_and_kl_against_hand_computed_values():
    clean = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    defended = torch.tensor([[1.0, 2.0, 0.0, -1.0, -2.0, -3.0], [3.0, 2.0, 2.5, 1.0, 1.5, 0.5]])
    result = victim_agreement(clean, defended)
    assert result['top1_agreement'].tolist() == [0.0, 0.0]
    assert result['top5_agreement'].tolist() == [1.0, 1.0]  # class 1 is 3rd of 6 in the second row's defended
    # first row: the two leading logits swap, so KL = (p0 - p1) * (log p0 - log p1) with p = softmax(clean)
    p = torch.softmax(clean[0].double(), 0)
    assert result['kl'][0].item() == pytest.approx(((p[0] - p[1]) * (p[0].log() - p[1].log())).item(), rel=1e-5)
    far = victim_agreement(clean[1:], torch.tensor([[9.0, -9.0, 9.0, 9.0, 9.0, 9.0]]))
    assert far['top5_agreement'].item() == 0.0  # the clean class is last of 6
