"""The Python API: the three things a researcher does in their own code, with explicit arguments (the parts of
config.Config they set) and nothing read from a command line.

    import recon_attack as ra
    victim = ra.cut('resnet18', 'layer1')             # victim.encode: the device's half; victim.classify: the server's
    trained = ra.train_attacker(images, victim=ra.VictimConfig('resnet18', 'layer1'), save_dir='runs/mine')
    result = ra.evaluate_attack(trained, other_images)  # per-image metrics, baselines, bound

docs/api.md says more, with an example that the tests run."""
from dataclasses import replace
from typing import NamedTuple
import torch


from .config import (AttackPlan, Config, DataConfig, DecoderSpec, DefenceConfig, NoiseConfig, Outputs, Runtime,
                     TrainConfig, VictimConfig)
from .data import as_uint8, fingerprint, given_splits
from .defences import check_flags
from .evaluate import PRIOR_IMAGES, Baselines, evaluate, run_bound, split_baselines, utility_charged
from .metrics import load_lpips, summarise
from .models.cuts import check_cut, cut_at, default_split
from .models.decoders import check, resolve
from .models.victims import build_victim
from .train import train
from .utils import UsageError, pick_device


def cut(arch=None, split=None, *, model=None, image_size=224, pretrained=False, weights=None, seed=0,
        normalize='imagenet'):
    """A classifier cut in two at `split` (a node or module of its traced graph; default: the middle cut): a frozen
    models.SplitVictim in eval mode whose `encode` is the device's half ([0, 1] images -> the tensor it sends) and
    `classify` the server's (that tensor -> logits). The classifier: the torchvision `arch`, or your own `model`
    ('path/to/file.py:function' or 'package.module:function'); its weights: torchvision's ImageNet ones
    (`pretrained`), a state-dict file (`weights`), or random ones from `seed`; `image_size`: the side of the images
    it will see (a ViT is built for it)."""
    victim = VictimConfig(arch=arch, split=split, pretrained=pretrained, weights=weights, seed=seed, model=model,
                          normalize=normalize)
    victim = replace(victim, split=split or default_split(victim, image_size))
    check_cut(victim, image_size)
    return build_victim(victim, image_size)


def train_attacker(images, *, victim=VictimConfig(), decoder=DecoderSpec(), training=TrainConfig(),
                   noise=NoiseConfig(), defence=DefenceConfig(), batch_size=32, split_seed=0, device='auto',
                   precision='bf16', save_dir='results'):
    """Train the attacker's decoder against the victim `victim` describes, on `images` (N, 3, S, S: uint8, or floats
    in [0, 1]), with the device's `noise` and `defence`: a seeded tenth of them is held out to validate on, never
    trained on. Writes its checkpoints (model.pth, ckpt_N.ckpt) and metrics.json into `save_dir`, as --train does.
    Returns a train.TrainedAttack: `attack` (the victim's halves, the device's defences and the trained decoder),
    `history`, `baselines`, `splits` (the images trained on and held out), `derived` and `config`."""
    images = as_uint8(images)
    config = Config(victim=victim, data=DataConfig(image_size=images.shape[-1], batch_size=batch_size,
                                                   split_seed=split_seed),
                    noise=noise, decoder=resolve(decoder), defence=defence, training=training,
                    runtime=Runtime(device=device, precision=precision), outputs=Outputs(save_dir=save_dir))
    check(config.decoder)
    check_cut(victim, config.data.image_size)
    check_flags(defence, cut_at(victim, config.data.image_size))
    splits = given_splits(images, batch_size, split_seed)
    if training.stop_patience:
        splits.set_stopping_images(split_seed)
    return train(config, pick_device(device), splits=splits)


class Evaluation(NamedTuple):
    """What evaluate_attack measured: each image's figures (PSNR, SSIM, MS-SSIM, MSE, LPIPS where its weights are
    cached, the victim's agreement where a defence acts, the bound where the tensor carries noise), their means and
    standard deviations, the same for each baseline, and what the bound is (or why there is none)."""
    per_image: dict
    summary: dict
    baselines: dict
    bound: object


def evaluate_attack(trained, images, *, plan=AttackPlan()):
    """Every figure of the attack `plan` (the decoder, the white-box optimisation, or both) of a train_attacker
    result on `images` (N, 3, S, S: uint8, or floats in [0, 1]), scored per image on [0, 1] pixels from the tensor
    the device sends (its noise and defences included, each image's draws seeded by its position), beside the
    baselines (the mean training image, and an untrained decoder of the same architecture) and, where the tensor
    carries Gaussian noise, the unbiased-attacker bound. Images the decoder trained on are left out, with a notice."""
    config, derived, attack = trained.config, trained.derived, trained.attack
    images = as_uint8(images)
    if images.shape[-1] != config.data.image_size:
        raise UsageError(f'images: the attacker was trained at {config.data.image_size} px, got {images.shape[-1]} px')
    splits = trained.splits
    trained_on = {splits.fingerprints[i] for i in splits.train_idx.tolist()}
    kept = torch.tensor([i for i, image in enumerate(images) if fingerprint(image) not in trained_on], dtype=torch.long)
    if len(kept) < len(images):
        print(f'{len(images) - len(kept)} of the {len(images)} images are images the decoder trained on: left out')
    if not len(kept):
        raise UsageError('images: every one of them is an image the decoder trained on; evaluate on others')
    noise, batch_size = derived.noise(config.noise).testing(), config.data.batch_size
    bound = run_bound(attack, derived.noise(config.noise), splits.calibration_images(PRIOR_IMAGES),
                      config.training.seed)
    baselines = Baselines(attack, config, derived, trained.mean_image)
    per_image = evaluate(attack, images, kept, batch_size, noise, utility=utility_charged(config, derived), plan=plan,
                         perceptual=load_lpips(attack.device),
                         measures=[baselines, *([bound] if bound.missing is None else [])])
    summary, found = split_baselines(summarise(per_image))
    return Evaluation(per_image, summary, found, bound.record(summarise(per_image)))
