import math

import pytest
import torch
import torch.nn.functional as F

from recon_attack import attacks, cut
from recon_attack.attacks import SplitAttack, build_attack, invert_features
from recon_attack.cli import build_parser, resolve_config
from recon_attack.config import DecoderSpec, VictimConfig
from recon_attack.models import (INTERPOLATIONS, SPLITS, Decoder, build_decoder, feature_shape, probe_feature_shape,
                                 resolve)
from recon_attack.utils import UsageError

ARCH_SPLITS = [(arch, split) for arch, splits in SPLITS.items() for split in splits]


@pytest.mark.parametrize('arch,split', ARCH_SPLITS)
def test_every_arch_and_split_builds_and_decodes_to_the_input_shape(arch, split):
    torch.manual_seed(0)
    victim = cut(arch, split)
    images = torch.rand(2, 3, 64, 64)
    for kind, interpolations in INTERPOLATIONS.items():
        for interpolation in interpolations:
            spec = resolve(DecoderSpec(kind=kind, interpolation=interpolation, depth='light'))
            decoder = build_decoder(feature_shape(victim, 64), 64, spec).eval()
            with torch.no_grad():
                out = decoder(victim.encode(images))
            assert out.shape == images.shape, spec.label()
            assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize('arch,split', ARCH_SPLITS)
def test_every_cut_trains_and_attacks_at_its_smallest_image_size(arch, split, tmp_path):
    """Down to a 1x1 feature map (layer4, block16, block15 at 32 px): flags, decoder step, white-box step, utility."""
    size = max(16, 256 // probe_feature_shape(VictimConfig(arch, split), 256)[1])  # its stride
    argv = ['--train', '--arch', arch, '--split', split, '--image_size', str(size), '--batch_size', '2',
            '--decoder_depth', 'light', '--precision', 'fp32', '--save_dir', str(tmp_path)]
    parser = build_parser()
    cfg = resolve_config(parser, parser.parse_args(argv), argv).config  # the flag checks probe the cut's shape
    torch.manual_seed(0)
    attack, _ = build_attack(cfg, torch.device('cpu'))
    images = torch.rand(2, 3, size, size)
    attack.decoder.train()
    loss = F.mse_loss(attack.reconstruct(images), images)
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in attack.decoder.parameters())
    sent = attack.send(images)
    recovered = invert_features(attack, sent, torch.full_like(images, 0.5), 1, 0.2, 0.3)
    assert recovered.shape == images.shape
    assert attack.classify(sent).shape == (2, 1000)


@pytest.mark.parametrize('arch,split', [('resnet18', 'layer2'), ('resnet50', 'layer3'), ('mobilenet_v2', 'block6'),
                                        ('mobilenet_v3_large', 'block13_expand')])
def test_encoder_then_tail_is_the_whole_victim(arch, split):
    import torchvision
    images = torch.rand(2, 3, 64, 64)
    victim = cut(arch, split, seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        whole = torchvision.models.get_model(arch, weights=None).eval()
    with torch.no_grad():
        expected = whole((images - victim.mean) / victim.std)
        assert torch.allclose(victim.classify(victim.encode(images)), expected, atol=1e-5)


def test_original_works_cut_is_672_channels_at_stride_16():
    victim = cut('mobilenet_v3_large', 'block13_expand')
    assert feature_shape(victim, 320) == (672, 20, 20)


def test_random_victim_is_a_function_of_the_seed():
    a, b, c = cut('resnet18', 'layer1', seed=1), cut('resnet18', 'layer1', seed=1), \
        cut('resnet18', 'layer1', seed=2)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_encoder_stays_frozen_through_training_steps():
    victim = cut('resnet18', 'layer2')
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    attack = SplitAttack(victim, Decoder(128, 8, 'transpose', 'light'), torch.device('cpu'))
    victim.train()  # whatever the caller asks, the victim stays in eval mode
    attack.decoder.train()
    assert not victim.training and not any(m.training for m in victim.modules())
    assert not any(p.requires_grad for p in victim.parameters())
    optimizer = torch.optim.SGD(attack.decoder.parameters(), lr=0.1)
    for _ in range(3):
        images = torch.rand(4, 3, 64, 64)
        loss = torch.nn.functional.mse_loss(attack.reconstruct(images), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = victim.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm running stats
    assert any('running_mean' in k for k in before)


def test_decoders_reach_the_image_side_from_any_map_and_refuse_what_is_no_map():
    """A map whose side is not the image's over a power of two (5 px for 64: 12.8) is decoded to the image's side
    by the last stage's resize; a 1x1 map (a vector) by six x2 stages."""
    for shape in ((64, 5, 5), (512,)):
        for kind in ('original', 'residual'):
            decoder = build_decoder(shape, 64, resolve(DecoderSpec(kind=kind, depth='light'))).eval()
            assert decoder(torch.randn(2, *shape)).shape == (2, 3, 64, 64), (shape, kind)
    with pytest.raises(UsageError, match='not a tensor of shape 5x7x9'):
        build_decoder((5, 7, 9), 64, DecoderSpec())


def test_weights_file_loads_into_the_victim_and_bad_files_are_named(tmp_path):
    import torchvision
    torch.manual_seed(1)
    source = torchvision.models.get_model('resnet18', weights=None)
    torch.save(source.state_dict(), tmp_path / 'victim.pth')
    victim = cut('resnet18', 'layer2', weights=str(tmp_path / 'victim.pth'))
    assert torch.equal(victim.encoder.conv1.weight, source.conv1.weight)
    assert victim.fingerprint() != cut('resnet18', 'layer2').fingerprint()
    with pytest.raises(UsageError, match='does not fit ResNet'):
        cut('resnet34', 'layer2', weights=str(tmp_path / 'victim.pth'))
    with pytest.raises(UsageError, match='no such file'):
        cut('resnet18', 'layer2', weights=str(tmp_path / 'missing.pth'))


@pytest.mark.parametrize('hardware', [True, False])
def test_the_arithmetic_recorded_is_the_one_that_ran(monkeypatch, hardware):
    """--precision bf16 is a request: where the hardware has no bf16 arithmetic it runs fp32, and says so."""
    monkeypatch.setattr(attacks, 'bf16_is_fast', lambda device: hardware)
    victim = cut('resnet18', 'layer1')
    for requested in (True, False):
        attack = SplitAttack(victim, None, torch.device('cpu'), bf16=requested)
        ran = requested and hardware
        assert attack.precision == ('bf16 autocast on cpu' if ran else 'fp32 on cpu')
        with attack.autocast():
            assert torch.is_autocast_enabled('cpu') == ran
