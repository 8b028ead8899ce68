"""Trained defences (--train_defence), the defence registry, and the privacy-utility frontier."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import tiny_config
from recon_attack.attacks import build_attack
from recon_attack.data import load_splits
from recon_attack.defence_training import defence_epoch, defended_record, train_defence, trainable_victim
from recon_attack.defences import DEFENCES, TRAINED, active, distance_correlation, initialise_by_pca
from recon_attack import cut
from recon_attack.models import feature_shape
from recon_attack.models.victims import bottleneck
from recon_attack.records import to_record, with_flags
from recon_attack.sweep import Sweep, comparable
from recon_attack.utils import UsageError, save_torch
from recon_attack.visualize import frontier

CPU = torch.device('cpu')


def defence_config(tmp_path, kind, **overrides):
    return tiny_config(tmp_path, train_defence=kind, defend_epochs=1, num_batches=6, **overrides)


def by_definition(x, z):
    """Distance correlation written out from Szekely et al.'s definitions, sample by sample, in float64."""
    x, z = x.reshape(len(x), -1).astype(np.float64), z.reshape(len(z), -1).astype(np.float64)
    n = len(x)

    def centred(v):
        d = np.array([[np.sqrt(((v[j] - v[k]) ** 2).sum()) for k in range(n)] for j in range(n)])
        return np.array([[d[j, k] - d[j].mean() - d[:, k].mean() + d.mean() for k in range(n)] for j in range(n)])
    a, b = centred(x), centred(z)
    dcov2 = lambda p, q: sum(p[j, k] * q[j, k] for j in range(n) for k in range(n)) / n ** 2  # noqa: E731
    return np.sqrt(dcov2(a, b) / np.sqrt(dcov2(a, a) * dcov2(b, b)))


def test_distance_correlation_agrees_with_the_definition():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 4, 4, generator=generator)
    z = torch.tanh(x.flatten(1)[:, :10] * 3) + 0.3 * torch.randn(7, 10, generator=generator)
    assert distance_correlation(x, z).item() == pytest.approx(by_definition(x.numpy(), z.numpy()), rel=1e-5)
    assert distance_correlation(x, 2 * x + 1).item() == pytest.approx(1.0, abs=1e-5)  # a similarity transform
    independent = distance_correlation(torch.randn(400, 2, generator=generator), torch.randn(400, 2, generator=generator))
    assert independent.item() < 0.15


def test_distance_correlation_has_finite_gradients():
    z = torch.randn(8, 5, requires_grad=True)
    distance_correlation(torch.randn(8, 3), z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_pca_start_of_a_full_width_bottleneck_is_the_identity():
    features = torch.randn(6, 8, 5, 5)
    squeeze, expand = bottleneck(8, 8)
    initialise_by_pca(squeeze, expand, features)
    with torch.no_grad():
        assert torch.allclose(expand(squeeze(features)), features, atol=1e-4)


@pytest.mark.parametrize('kind', TRAINED)
def test_defence_training_leaves_the_original_victim_bit_identical(tmp_path, kind):
    cfg = defence_config(tmp_path, kind, defend_server=True)
    net, student, reference = trainable_victim(cfg.victim, 32, server=cfg.defence.server)
    splits = load_splits(cfg.data)
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    defence = DEFENCES[kind]
    strength = cfg.defence.strengths[defence.flag]
    student = defence.prepare(student, strength, student.encode(torch.rand(8, 3, 32, 32)).detach())
    term = defence.privacy_term(strength, student, reference, feature_shape(student, 32), cfg.training.seed, 32)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    defence_epoch(student, reference, term, optimizer, splits, 16, CPU, torch.Generator().manual_seed(0))
    assert all(torch.equal(original[k], v) for k, v in reference.state_dict().items())
    assert not torch.equal(net.layer1[0].conv1.weight, reference.encoder.get_submodule('layer1.0.conv1').weight)  # the copy moved
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize('kind', TRAINED)
def test_the_defended_file_loads_with_weights_and_sends_the_same_tensor(tmp_path, kind):
    cfg = defence_config(tmp_path, kind)
    net, student, reference = trainable_victim(cfg.victim, 32)
    images = torch.rand(4, 3, 32, 32)
    strength = cfg.defence.strengths[DEFENCES[kind].flag]
    student = DEFENCES[kind].prepare(student, strength, student.encode(images).detach())
    with torch.no_grad():
        for p in student.encoder.parameters():  # as if trained: any change must travel in the file
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / 'defended.pth'
    save_torch(defended_record(cfg.victim, cfg.defence, DEFENCES[kind], net, student, load_splits(cfg.data)), path)
    loaded = cut('resnet18', 'layer2', weights=str(path))
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), student.encode(images))
        assert torch.equal(loaded.classify(loaded.encode(images)), student.classify(student.encode(images)))
    assert loaded.defended['reference'] == {'pretrained': False, 'seed': 0, 'weights': None}
    with pytest.raises(UsageError, match='defended at its layer2 cut; pass --arch resnet18 --split layer2'):
        cut('resnet18', 'layer3', weights=str(path))


def test_defend_then_attack_end_to_end(tmp_path, main_here):
    """--train_defence writes the defended victim; --train --weights attacks it from scratch, and its utility is charged
    against the original victim on the same held-out images as defence training measured."""
    common = ('--image_size', '32', '--batch_size', '16', '--num_batches', '8', '--num_workers', '0')
    out = main_here(tmp_path, '--train_defence', 'bottleneck', '--bottleneck_channels', '32', '--defend_epochs', '2',
                    *common, '--save_dir', 'defended').stdout
    assert 'bottleneck (channels 32): 2 epochs' in out and 'outputs written to' in out
    record = json.loads((tmp_path / 'defended' / 'defence.json').read_text())
    assert record['sent_shape'] == [32, 4, 4] and len(record['history']) == 2
    trained = main_here(tmp_path, '--train', '--weights', 'defended/defended_victim.pth', '--num_epochs', '1',
                        '--decoder_depth', 'light', *common, '--save_dir', 'attack')
    assert trained.returncode == 0, trained.stderr
    result = json.loads((tmp_path / 'attack' / 'eval.json').read_text())
    assert result['config']['victim_defence'] == 'trained defence: bottleneck (channels 32)'
    assert result['config']['sent_shape'] == [32, 4, 4]
    assert 'original victim' in result['utility']
    for name in ('top1_agreement', 'kl'):
        assert result['metrics'][name]['mean'] == pytest.approx(record['held_out']['after'][name], abs=1e-5)
    assert result['metrics']['kl']['mean'] > 0  # the original is the reference, not the defended victim itself


def test_each_defence_is_switched_on_by_its_own_settings(tmp_path):
    cfg = tiny_config(tmp_path)
    assert active(cfg.defence, cfg.noise) == []
    for name, defence in DEFENCES.items():
        switched_on = with_flags(cfg, **defence.settings(0.25))
        switched = [(d.name, s) for d, s in active(switched_on.defence, switched_on.noise)]
        assert switched == [(name, 0.25)], name


@pytest.mark.parametrize('flag, sweep_value, message', [
    (('--defence', 'topk', '--defence_k', '2.5'), 'topk:2.5', 'a fraction in (0, 1] or a whole count, got 2.5'),
    (('--defence', 'dropout', '--defence_p', '1'), 'dropout:1', 'a dropout probability in [0, 1), got 1'),
    (('--keep_channels', '500'), 'keep_channels:500', 'resnet18 cut at layer2 sends only 128 channels, got 500'),
    (('--train_defence', 'nopeek', '--nopeek_weight', '-1'), 'nopeek:-1', 'a weight cannot be negative, got -1'),
    (('--train_defence', 'bottleneck', '--bottleneck_channels', '0'), 'bottleneck:0', 'must be positive, got 0'),
])
def test_a_flag_and_its_sweep_value_are_checked_alike(main_here, tmp_path, flag, sweep_value, message):
    by_flag = main_here(tmp_path, *(('--train',) if flag[0] != '--train_defence' else ()), *flag)
    by_sweep = main_here(tmp_path, '--sweep', 'defence', '--sweep_values', sweep_value)
    for result in (by_flag, by_sweep):
        assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr


def test_adversarial_record_keeps_its_own_attacker_apart_and_another_cut_is_one_line(tmp_path):
    cfg = defence_config(tmp_path, 'adversarial', save_dir=str(tmp_path / 'defended'))
    held_out = train_defence(cfg, CPU)['held_out']
    assert 'simulated_attacker_psnr' not in held_out['before']
    assert 5 < held_out['after']['simulated_attacker_psnr'] < 60
    weights = os.path.join(cfg.outputs.save_dir, 'defended_victim.pth')
    with pytest.raises(UsageError, match='pass --arch resnet18 --split layer2'):
        build_attack(tiny_config(tmp_path, split='layer1', weights=weights), CPU)


def test_frontier_keeps_the_points_nothing_beats():
    points = [(1.0, 20.0), (0.9, 15.0), (0.9, 18.0), (0.5, 15.0), (0.2, 10.0)]
    assert frontier(points) == [(0.2, 10.0), (0.9, 15.0), (1.0, 20.0)]


def test_defence_training_flags_matter_only_to_trained_sweep_values(tmp_path):
    cfg = tiny_config(tmp_path)
    changed = with_flags(cfg, defend_epochs=3, nopeek_weight=2.0)

    def value_config(config, value):
        return to_record(Sweep(config, 'defence', [value]).run(value))
    assert comparable(value_config(cfg, 'dropout:0.5')) == comparable(value_config(changed, 'dropout:0.5'))
    assert comparable(value_config(cfg, 'nopeek:1')) != comparable(value_config(changed, 'nopeek:1'))
    assert value_config(cfg, 'nopeek:1')['nopeek_weight'] == 1.0


def test_the_fisher_penalty_cannot_be_gamed_by_shifting_or_scaling_the_tensor(tmp_path):
    """The penalty is 1 (times its weight) for the original victim, and stays 1 for a device half that sends
    5 f(x) + 3 or f(x) / 5 + 3: neither shift nor scale hides anything (the uncentred penalty of d22d2e4 fell 76x
    under a shift); a half that sends 5 f(x) carries more information under a fixed noise and pays for it."""
    cfg = defence_config(tmp_path, 'fil')
    _, student, reference = trainable_victim(cfg.victim, 32)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    class Changed(torch.nn.Module):
        def __init__(self, victim, scale, shift):
            super().__init__()
            self.victim, self.scale, self.shift = victim, scale, shift

        def encode(self, x):
            return self.scale * self.victim.encode(x) + self.shift

    def penalty(victim):
        return DEFENCES['fil'].privacy_term(1.0, victim, reference, None, 0, 32)(images, victim.encode(images)).item()
    assert penalty(student) == pytest.approx(1.0, rel=1e-5)
    assert penalty(Changed(student, 5.0, 3.0)) == pytest.approx(25.0, rel=1e-4)  # more sent under a fixed noise
    assert penalty(Changed(student, 0.2, 3.0)) == pytest.approx(1.0, rel=1e-4)  # what it hides at relative noise


@pytest.mark.parametrize('weight, lr, epochs', [(10.0, 1e-3, 3), (None, None, 4)])  # the old test's, the defaults
def test_the_fisher_defence_lowers_the_ceiling_at_relative_noise_not_raising_it_at_absolute_noise(tmp_path, weight,
                                                                                                   lr, epochs):
    """On held-out images: a lower unbiased ceiling than the original at noise scaled to each tensor's centred
    power, not a higher one at the original's fixed noise variance; at the default strength the victim keeps most
    of its predictions."""
    flags = {} if weight is None else {'fil_weight': weight, 'defend_lr': lr}
    record = train_defence(tiny_config(tmp_path, train_defence='fil', defend_epochs=epochs, num_batches=6, **flags),
                           CPU)
    fisher = record['fisher']
    assert fisher['relative_db'] < fisher['original_db'] - 0.5
    assert fisher['absolute_db'] <= fisher['original_db']
    if weight is None:
        assert record['held_out']['after']['top1_agreement'] >= 0.5
    saved = json.loads((tmp_path / 'run' / 'defence.json').read_text())
    assert saved['fisher'] == fisher


