import math

import pytest
import torch
from pytorch_msssim import ms_ssim

from evaluate import MIN_MSE, ms_ssim_per_image, msssim_scales, psnr, score


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
