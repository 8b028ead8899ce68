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
    term = defence.privacy_term(strength, student, feature_shape(student, 32), cfg.training.seed, 32)
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


def test_the_fisher_defence_lowers_the_jacobian_energy_it_penalises(tmp_path):
    """--train_defence fil: after an epoch, the device's half has less tr(J^T J) per unit of sent energy (what sets
    dFIL under noise scaled to the tensor) than the victim it started from, and than distillation alone leaves."""
    from recon_attack.bound import hutchinson_trace
    from recon_attack.noise import generators_for
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def jacobian_energy(victim):
        with torch.no_grad():
            trace, _ = hutchinson_trace(victim.encode, images, 8, generators_for('bound probes', range(6)))
            return (trace / victim.encode(images).pow(2).flatten(1).sum(1)).mean().item()

    after = {}
    for weight in (0.0, 10.0):
        cfg = defence_config(tmp_path, 'fil', fil_weight=weight, defend_lr=1e-3)
        _, student, reference = trainable_victim(cfg.victim, 32)
        before = jacobian_energy(student)
        term = DEFENCES['fil'].privacy_term(weight, student, feature_shape(student, 32), cfg.training.seed, 32)
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        defence_epoch(student, reference, term, optimizer, load_splits(cfg.data), 16, CPU,
                      torch.Generator().manual_seed(0))
        after[weight] = jacobian_energy(student)
    assert after[10.0] < 0.7 * before
    assert after[10.0] < 0.7 * after[0.0]
