"""Honest image-quality metrics on [0, 1] images, per image with data_range 1 (PSNR, SSIM, MS-SSIM, LPIPS), and the
victim's utility: its agreement with itself undefended."""
import functools
import hashlib
import math
import os
import warnings

import lpips
import torch
import torch.nn.functional as F
import torchvision
from pytorch_msssim import ms_ssim, ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in pytorch-msssim
WIN_SIZE = 11
MIN_MSE = 1e-10  # PSNR of identical images is capped at 100 dB instead of being infinite
METRICS = ('mse', 'psnr', 'ssim', 'ms_ssim')
PERCEPTUAL = 'lpips'  # scored beside METRICS where its backbone's weights are in the hub cache
LPIPS_BACKBONE = torchvision.models.AlexNet_Weights.IMAGENET1K_V1  # LPIPS v0.1 'alex', as the attack papers use
UTILITY = ('top1_agreement', 'top5_agreement', 'kl')  # the victim's predictions with vs without the defence


def psnr(x, y):
    """Per-image PSNR in dB for [0, 1] images: 10 log10(1 / MSE), MSE over each image's own pixels."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(MIN_MSE))


def msssim_scales(size):
    """MS-SSIM scales usable at this image size: each of the 4 halvings needs the side > 10 * 2^k."""
    return max(1, min(len(MSSSIM_WEIGHTS), int(math.floor(math.log2((size - 1) / (WIN_SIZE - 1)))) + 1))


def ms_ssim_per_image(x, y, scales=None):
    """Per-image MS-SSIM (data_range 1). Below 161 px the coarsest scales do not fit; the scales that do are
    used with their weights renormalised to sum to 1 (see `msssim_scales`). pytorch-msssim's public ms_ssim refuses
    images that small whatever its weights, so fewer scales go through its SSIM helpers, as ms_ssim itself does."""
    if scales is None:
        scales = msssim_scales(min(x.shape[-2:]))
        if scales == len(MSSSIM_WEIGHTS):
            return ms_ssim(x, y, data_range=1.0, size_average=False, win_size=WIN_SIZE)
    weights = x.new_tensor(MSSSIM_WEIGHTS[:scales])
    weights = weights / weights.sum()
    win = _fspecial_gauss_1d(WIN_SIZE, 1.5).repeat(x.shape[1], 1, 1, 1).to(x)
    factors = []
    for level in range(scales):  # the same recursion as pytorch_msssim.ms_ssim, stopped early
        ssim_map, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < scales - 1:
            factors.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    factors.append(torch.relu(ssim_map))
    return torch.prod(torch.stack(factors) ** weights.view(-1, 1, 1), dim=0).mean(1)


@functools.lru_cache(maxsize=4)
def sha256_of_file(path, size, mtime_ns):
    """The file's sha256 (hex), computed once per version of the file (`size`, `mtime_ns`) in a process."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def is_torchvision_file(path):
    """Whether the file's sha256 begins with the hash its torchvision file name carries (torch.hub's rule)."""
    stat = os.stat(path)
    return sha256_of_file(path, stat.st_size, stat.st_mtime_ns).startswith(
        torch.hub.HASH_REGEX.search(os.path.basename(path)).group(1))


def load_lpips(device):
    """LPIPS (Zhang et al. 2018; the `lpips` package's linear layers on torchvision's ImageNet AlexNet), or None
    with one line saying which file is missing or not torchvision's: its backbone comes from the torch hub cache,
    like --use_pretrained, and is never downloaded, left random or taken from another file of that name."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(LPIPS_BACKBONE.url))
    if not os.path.isfile(path):
        print(f'LPIPS skipped: its AlexNet weights are not in the torch hub cache ({path} is missing; put '
              f'torchvision\'s file there, or set TORCH_HOME, to score it)')
        return None
    if not is_torchvision_file(path):
        print(f'LPIPS skipped: {path} is not torchvision\'s AlexNet file (its sha256 does not begin with the hash '
              f'in its name); replace it with torchvision\'s file to score LPIPS')
        return None
    with warnings.catch_warnings():  # lpips builds its AlexNet with torchvision's deprecated `pretrained=False`
        warnings.simplefilter('ignore', UserWarning)
        metric = lpips.LPIPS(net='alex', pnet_rand=True, verbose=False)  # the backbone's weights are loaded next
    backbone = torchvision.models.alexnet(weights=LPIPS_BACKBONE).features
    for part in metric.net.children():  # lpips splits AlexNet's `features` into slices, keeping layer indices
        for index, layer in part.named_children():
            layer.load_state_dict(backbone[int(index)].state_dict())
    return metric.to(device).eval().requires_grad_(False)


def score(recon, target, perceptual=None):
    """Per-image metrics of a batch of [0, 1] images; LPIPS too when `perceptual` (load_lpips) is given."""
    recon, target = recon.float().clamp(0, 1), target.float()
    scores = {'mse': (recon - target).pow(2).flatten(1).mean(1), 'psnr': psnr(recon, target),
              'ssim': ssim(recon, target, data_range=1.0, size_average=False, win_size=WIN_SIZE),
              'ms_ssim': ms_ssim_per_image(recon, target)}
    if perceptual is not None:
        scores[PERCEPTUAL] = perceptual(recon, target, normalize=True).flatten()
    return scores


def victim_agreement(clean_logits, defended_logits):
    """Per image: does the defended victim still predict the undefended top-1 class (at top-1, within its top-5),
    and KL(undefended || defended) between the two output distributions, in nats."""
    reference = clean_logits.argmax(1, keepdim=True)
    top5 = defended_logits.topk(min(5, defended_logits.shape[1]), dim=1).indices
    kl = F.kl_div(defended_logits.log_softmax(1), clean_logits.log_softmax(1), log_target=True, reduction='none')
    return {'top1_agreement': (defended_logits.argmax(1, keepdim=True) == reference).float().squeeze(1),
            'top5_agreement': (top5 == reference).any(1).float(), 'kl': kl.sum(1)}


def msssim_note(image_size):
    scales = msssim_scales(image_size)
    if scales == len(MSSSIM_WEIGHTS):
        return 'MS-SSIM: standard 5 scales'
    return f'MS-SSIM: {scales} of 5 scales at {image_size}px (the coarser ones need >160 px), weights renormalised'


def summarise(per_image):
    return {m: {'mean': v.mean().item(), 'std': v.std().item() if len(v) > 1 else 0.0} for m, v in per_image.items()}


def format_summary(summary):
    return '  '.join(f'{m.upper() if m != "ms_ssim" else "MS-SSIM"} {s["mean"]:.4f}±{s["std"]:.4f}'
                     if m != 'psnr' else f'PSNR {s["mean"]:.2f}±{s["std"]:.2f} dB'
                     for m, s in summary.items() if m in METRICS + (PERCEPTUAL,))


def format_utility(summary):
    return (f'victim top-1 agreement {summary["top1_agreement"]["mean"]:.3f}  top-5 agreement '
            f'{summary["top5_agreement"]["mean"]:.3f}  KL {summary["kl"]["mean"]:.4f} nats')
