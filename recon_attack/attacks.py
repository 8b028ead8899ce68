"""The attack: what crosses the cut (the device's half of the victim and its defences) and the attacker's ways of
turning it back into an image: the learned decoder, the white-box optimisation of He et al. 2019, or both."""
import copy
import dataclasses
import math
import os

import torch
import torchvision

from .bound import calibrated_variance, snr_variance
from .config import Derived, VictimConfig
from .defences import KEEP_CHANNELS, REFERENCE_PRETRAINED, active, recorded_defence
from .models.decoders import build_decoder, resolve
from .models.layouts import layout_of
from .models.cuts import default_split
from .models.victims import build_victim, entry_digest, feature_shape, is_entry_point
from .noise import add_noise, stream_seed, held_out_draws
from .utils import UsageError, progress, to_unit

# Each attack (--attack) and what it does: how the attacker turns the sent tensor into an image.
ATTACKS = {'decoder': 'the trained decoder',
           'optimize': 'white-box rMLE, no decoder needed (alone it is its own mode)',
           'decoder+optimize': "rMLE started from the decoder's output",
           'all': 'every attack above that applies, on the same sent tensor, and each image\'s worst case over them '
                  '(an oracle that knows the image) beside the reconstruction an attacker picks without it'}
SINGLE_ATTACKS = ('decoder', 'optimize', 'decoder+optimize')  # what --attack all runs
WHITE_BOX_ALONE = "white-box rMLE with the victim's weights, no decoder"  # the attacker of --attack optimize
WHITE_BOX_REFINEMENT = "white-box rMLE refinement (the victim's weights) of a"  # decoder+optimize, then the decoder


def bf16_is_fast(device):
    """bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (measured 1.7-2.4x faster decoder steps on such a CPU); elsewhere it would be emulated."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    try:  # torch has no public query for it; this oneDNN one is what torch's own test helpers ask
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class SplitAttack:
    """What crosses the cut (the device's encoder output after any defence) and the attacker's decoder.

    The victim runs under inference mode; only the decoder is trained. Both use channels_last (measured 1.4-2x
    faster convolutions on the CPU as on CUDA); `bf16` adds bf16 autocast where the hardware has bf16 arithmetic,
    and `compile` runs both through torch.compile. `decoder` is the module itself (its state dict, evaluation);
    training may swap `decoder_step` for a DistributedDataParallel wrapper."""

    def __init__(self, victim, decoder, device, bf16=False, compile=False):
        self.device, self.bf16 = device, bf16 and bf16_is_fast(device)
        self.victim = victim.to(device, memory_format=torch.channels_last)
        self.decoder = decoder.to(device, memory_format=torch.channels_last) if decoder is not None else None
        self.run_victim = torch.compile(self.victim.encode) if compile else self.victim.encode
        self.decoder_step = torch.compile(self.decoder) if compile and decoder is not None else self.decoder
        self.channel_mask = None  # (1, C, 1, 1) of 0 / 1 when the device sends a subset of the channels
        self.on_tensor = []  # the fixed defences' arithmetic (defences.OnTensor), in order
        self.reference = None  # for a defended victim: the original one, what its predictions are charged against

    def charge_against(self, reference):
        """A defended victim's utility is charged against `reference`, the original victim, run exactly as the
        victim is (memory format, autocast), so that an unchanged victim costs nothing."""
        self.reference = reference.to(self.device, memory_format=torch.channels_last)

    def using(self, decoder):
        """The same attack (victim, defences) with another decoder, e.g. the average of the trained weights."""
        other = copy.copy(self)
        other.decoder = other.decoder_step = decoder
        return other

    def keep_only(self, channel_indices, shape):
        """Send only these channels of a tensor of `shape` (no batch), the rest as zeros."""
        layout = layout_of(tuple(shape))
        mask = [1] * (len(shape) + 1)
        mask[layout.channel_axis()] = layout.channels(shape)
        self.channel_mask = torch.zeros(mask, device=self.device)
        self.channel_mask.view(-1)[channel_indices] = 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @property
    def precision(self):
        """The arithmetic the victim and decoder ran in, as every record names it (--precision bf16 falls back to
        fp32 where the hardware has no bf16 arithmetic, so the flag alone does not say)."""
        return f'bf16 autocast on {self.device.type}' if self.bf16 else f'fp32 on {self.device.type}'

    def to_images(self, uint8_images):
        """uint8 batch (on the CPU) -> float [0, 1] on the device."""
        if self.device.type == 'cuda':
            uint8_images = uint8_images.pin_memory()
        images = to_unit(uint8_images.to(self.device, non_blocking=True))
        return images.contiguous(memory_format=torch.channels_last)

    def encode(self, images, noise=None, draws=None):
        """The victim's intercepted tensor, with the device's input noise if any (a config.Noise; `draws`: a
        noise.Draws)."""
        if noise is not None and noise.at == 'input':
            images = add_noise(images, noise, draws.noise)
        return self.run_encoder(self.run_victim, images)

    def run_encoder(self, encode, images):
        """A device half `encode` on [0, 1] images as the device runs it: inference mode, bf16 autocast where on,
        fp32 out."""
        with torch.inference_mode(), self.autocast():
            features = encode(images).float()
        return features.clone()  # a normal tensor again, which autograd may save (the decoder's first layer does)

    def defend(self, features, noise=None, draws=None):
        """What the device sends: the intercepted tensor after its feature-side defences (noise, then the fixed
        defences' arithmetic such as dropout or top-k, then the channel subset), so that dropped elements reach the
        server as exact zeros. `draws`: a noise.Draws, or None (a fixed seed)."""
        if noise is not None and noise.at == 'features':
            features = add_noise(features, noise, draws.noise)
        for defence in self.on_tensor:
            features = defence(features, draws and draws.masks)
        if self.channel_mask is not None:
            features = features * self.channel_mask
        return features

    def send(self, images, noise=None, draws=None):
        return self.defend(self.encode(images, noise, draws), noise, draws)

    def decode(self, features, activations=None, training=False):
        with self.autocast():
            return (self.decoder_step if training else self.decoder)(features, activations).float()

    def reconstruct(self, images, noise=None, draws=None):
        return self.decode(self.send(images, noise, draws))

    @torch.no_grad()
    def classify(self, features, victim=None):
        """The logits of `victim` (default: this attack's) from a tensor that crossed the cut (the server's half of
        the inference), in fp32: they are the victim's utility metrics, which bf16 rounding would blur."""
        with torch.autocast(self.device.type, enabled=False):
            return (self.victim if victim is None else victim).classify(features.float())

    @torch.no_grad()
    def undefended_logits(self, images, undefended):
        """What the victim would predict without any defence: from the `undefended` tensor, or, for a defended
        victim, the original victim's prediction of the images, computed the same way as the defended one's."""
        if self.reference is None:
            return self.classify(undefended)
        return self.classify(self.run_encoder(self.reference.encode, images), self.reference)


def total_variation(images):
    """Per image: the mean absolute difference between vertically and between horizontally adjacent pixels."""
    return ((images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
            + (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1))


def feature_error(attack, images, sent):
    """Per image: ||f(x) - z||^2 / ||z||^2 between the frozen victim's encoding of `images` and the sent tensor z,
    over the elements the attacker can see (a defence's zeros are not matched; dropout's 1 / (1 - p) undone).
    Relative, so a weight on it means the same for every cut. Gradients flow to `images` only."""
    trusted = (sent != 0) if any(d.defence.zeroes for d in attack.on_tensor) else attack.channel_mask
    for defence in attack.on_tensor:
        sent = defence.as_seen(sent)
    with attack.autocast():
        features = attack.victim.encode(images.contiguous(memory_format=torch.channels_last)).float()
    error = features - sent if trusted is None else (features - sent) * trusted
    return error.pow(2).flatten(1).sum(1) / sent.pow(2).flatten(1).sum(1).clamp_min(1e-12)


def invert_features(attack, sent, start, steps, lr, tv_weight, desc='optimising'):
    """The white-box attack (rMLE, He, Zhang & Lee 2019): knowing the victim's weights, find the image x in
    [0, 1] (through a sigmoid) that minimises feature_error(x, z) + tv_weight * TV(x) for the sent tensor z, by
    Adam from `start`. Only the image receives gradients; the victim stays frozen."""
    logits = torch.logit(start.detach().float().clamp(1e-3, 1 - 1e-3)).contiguous(memory_format=torch.channels_last)
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in progress(range(steps), desc=desc, unit='step'):
        images = torch.sigmoid(logits)
        loss = feature_error(attack, images, sent) + tv_weight * total_variation(images)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # a sum of per-image losses: every image is optimised as if alone
        optimizer.step()
    return torch.sigmoid(logits).detach()


def received(attack, target, positions, noise=None):
    """(encoded, sent) for the [0, 1] images `target` at `positions` among the images scored: what the device's half
    computed, and what it sent after its defences. Each image's random draws (test noise, dropout masks) come from
    generators seeded by its position (noise.held_out_draws), so the evaluation, every figure and every sample grid of
    the same images see exactly the same tensor, whatever the batch."""
    draws = held_out_draws(positions, attack.device)
    encoded = attack.encode(target, noise, draws)
    return encoded, attack.defend(encoded, noise, draws)


@torch.no_grad()
def recover(attack, sent, plan, shape):
    """The attacker's images (of `shape`) from the sent tensor, by the config.AttackPlan `plan`: the decoder's
    output, the white-box optimisation from a neutral grey image, or the optimisation started from the decoder's
    output."""
    if plan.kind == 'decoder':
        return attack.decode(sent)
    start = attack.decode(sent) if plan.kind == 'decoder+optimize' else torch.full(shape, 0.5, device=sent.device)
    with torch.enable_grad():
        return invert_features(attack, sent, start, plan.steps, plan.lr, plan.tv_weight,
                               desc=f'{plan.kind} ({plan.steps} steps)')


def attacker_label(decoder, feature_weight=0.0):
    """The attacker of a config.DecoderSpec, named in every output: black-box (the device's half queried, its
    weights unknown) unless it trained with the victim's weights in its loss (`feature_weight`)."""
    knowledge = f'white-box (feature consistency {feature_weight:g})' if feature_weight else 'black-box'
    return f'{knowledge} {resolve(decoder).label()}'


def attacker_name(kind, decoder, feature_weight=0.0):
    """The attacker of attack `kind`, as every output names it: the white-box optimisation alone, the decoder (and
    what it knows), the white-box refinement of that decoder's output (white-box, whatever the decoder knew), or
    the worst case over all of them."""
    if kind == 'optimize':
        return WHITE_BOX_ALONE
    label = attacker_label(decoder, feature_weight)
    if kind == 'all':
        return f'the worst case per image over the decoder, {WHITE_BOX_ALONE} and the refinement of a {label}'
    return label if kind == 'decoder' else f'{WHITE_BOX_REFINEMENT} {label}'


def build_attack(config, device, calibration_images=None, derived=Derived()):
    """Victim, decoder and defences as the configuration (a config.Config) describes them, the decoder initialised
    from the attacker's seed. Returns the attack and what building it found out (a config.Derived): the sent tensor's
    shape, the victim's fingerprint, the channels kept, the noise calibrated to a bound, a defended victim's record.
    `derived`: what the run found before (a checkpoint's), kept: the same channels, the same noise, and the same
    victim or a one-line refusal. `calibration_images`: uint8 training images on which the device chooses its
    channels or calibrates its noise, where those are not known yet."""
    spec, image_size = config.victim, config.data.image_size
    digest = entry_digest(spec.model) if spec.model else None
    if derived.victim_digest not in (None, digest):
        raise UsageError(f'--victim {spec.model}: its file changed since this run was trained (sha256 '
                         f'{derived.victim_digest[:12]}, now {digest[:12]}); restore it, or train a new run')
    victim = build_victim(spec, image_size)
    expected = derived.victim_fingerprint
    if expected is not None and not math.isclose(victim.fingerprint(), expected, rel_tol=1e-6):
        raise UsageError('the victim rebuilt from the checkpoint\'s settings (arch, --use_pretrained/--weights, seed) '
                         'is not the one this decoder was trained against; pass the same victim weights')
    torch.manual_seed(config.training.seed)
    shape = feature_shape(victim, image_size)
    decoder = build_decoder(shape, image_size, config.decoder)
    attack = SplitAttack(victim, decoder, device, bf16=config.runtime.precision == 'bf16',
                         compile=config.runtime.compile)
    found = {'sent_shape': shape, 'victim_fingerprint': victim.fingerprint(), 'victim_digest': digest}
    for defence, strength in active(config.defence, derived.noise(config.noise)):
        defence.apply(attack, strength)
    if config.defence.keep_channels is not None:
        found['channel_indices'] = derived.channel_indices or KEEP_CHANNELS.choose(
            encoded(attack, calibration_images), layout_of(shape).channel_axis(), config.defence.keep_channels,
            config.defence.channel_select, stream_seed('channel subset', config.victim.seed))
        attack.keep_only(found['channel_indices'], shape)
    if config.noise.for_bound is not None and derived.bound_calibration is None:
        found['bound_calibration'] = calibrate_noise(attack, config.noise, calibration_images)
    if config.noise.snr is not None and derived.snr_calibration is None:
        found['snr_calibration'] = calibrate_snr(attack, config.noise, calibration_images)
    found.update(charge(attack, victim, config.victim, image_size))
    return attack, dataclasses.replace(derived, **found)


def encoded(attack, calibration_images):
    """The clean tensors of `calibration_images` (uint8), on the CPU."""
    if calibration_images is None:
        raise ValueError('the defence needs calibration images to choose its channels')
    return attack.encode(attack.to_images(calibration_images)).cpu()


def calibrate_noise(attack, noise, calibration_images):
    """--noise_for_bound DB: the variance of the noise on the tensor, on while the attacker trains and when it is
    measured, at which the unbiased-attacker PSNR ceiling on `calibration_images` (uint8, training images) is DB
    (on average, or on a share --bound_quantile of them); returns the record of the calibration, which every later
    evaluation of the run reads its noise from."""
    if calibration_images is None:
        raise ValueError('--noise_for_bound needs calibration images to set its noise')
    variance, record = calibrated_variance(attack, attack.to_images(calibration_images), noise.for_bound, noise.probes,
                                           noise.quantile)
    print(f'--noise_for_bound {noise.for_bound:g}: noise of variance {variance:.4g} (sigma {record["sigma"]:.4g}) on '
          f'the tensor: {noise.for_bound:g} dB is {record["meaning"]}')
    return record


def calibrate_snr(attack, noise, calibration_images):
    """--noise_snr DB: the variance of the noise on the tensor DB below its centred power on `calibration_images`
    (uint8, training images); returns the record, which every later evaluation of the run reads its noise from."""
    if calibration_images is None:
        raise ValueError('--noise_snr needs calibration images to set its noise')
    variance, record = snr_variance(attack, attack.to_images(calibration_images), noise.snr)
    print(f'--noise_snr {noise.snr:g}: noise of variance {variance:.4g} (sigma {record["sigma"]:.4g}) on the tensor, '
          f'{record["meaning"]}')
    return record


def charge(attack, victim, spec, image_size):
    """A defended victim's utility is charged against the original victim: the one its file names (--train_defence),
    or --reference for a defence of your own; returns what that says of the run (the defence's name in outputs and
    the flags it was trained with), nothing for an undefended victim."""
    if victim.defended is not None:
        if spec.reference:
            raise UsageError(f'--reference: --weights {spec.weights} is a defended victim written by '
                             '--train_defence, which names the original victim it is charged against itself; drop '
                             '--reference')
        reference = victim.defended['reference']
        original = dataclasses.replace(spec, pretrained=reference['pretrained'], weights=reference['weights'],
                                       seed=reference['seed'], reference=None)
        attack.charge_against(build_victim(original, image_size))
        return {'victim_defence': victim.defended['label'], 'defended_with': recorded_defence(victim.defended)}
    if spec.reference:
        attack.charge_against(reference_victim(spec, image_size))
        defended = f'--weights {os.path.basename(spec.weights)}' if spec.weights else f'--victim {spec.model}'
        return {'victim_defence': f'your defence: {defended}, charged against --reference {spec.reference}'}
    return {}


def reference_victim(spec, image_size):
    """--reference: the original victim a defence of your own is charged against: torchvision's ImageNet weights of
    the same network ('pretrained'), a state-dict file of it, or another network (a torchvision classifier with its
    ImageNet weights, or FILE.py:FUNCTION), where the defence changed the architecture; cut anywhere, since only its
    predictions count."""
    reference = spec.reference
    if reference == REFERENCE_PRETRAINED:
        original = dataclasses.replace(spec, pretrained=True, weights=None, reference=None)
    elif reference in torchvision.models.list_models(module=torchvision.models):
        original = VictimConfig(arch=reference, split=None, pretrained=True, seed=spec.seed)
    elif is_entry_point(reference):
        original = VictimConfig(arch=None, split=None, model=reference, seed=spec.seed, normalize=spec.normalize)
    else:
        original = dataclasses.replace(spec, pretrained=False, weights=reference, reference=None)
    if original.split is None:
        original = dataclasses.replace(original, split=default_split(original, image_size))
    return build_victim(original, image_size, flag='--reference')
