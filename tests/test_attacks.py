"""The white-box optimisation attack, the dropout / top-k defences, and the attack and defence comparison sweeps."""
import csv
import json

import pytest
import torch

from conftest import record_recover, run_cli, tiny_config
from recon_attack import cli, evaluate as evaluate_module, worst_case
from recon_attack.attacks import build_attack, invert_features, total_variation
from recon_attack.config import AttackPlan
from recon_attack.data import load_splits
from recon_attack.defences import DEFENCES
from recon_attack.evaluate import evaluate, mean_image_baseline, mean_training_image
from recon_attack.metrics import summarise

CPU = torch.device('cpu')
TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '1',
        '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0')


def test_optimisation_attack_beats_the_mean_image_with_its_default_steps(tmp_path):
    cfg = tiny_config(tmp_path, split='layer1')
    (attack, _), splits = build_attack(cfg, CPU), load_splits(cfg.data)
    first = splits.val_idx[:16]
    optimised = summarise(evaluate(attack, splits.images, first, 16, plan=AttackPlan(kind='optimize')))
    mean = mean_training_image(splits)
    baseline = summarise({m: v[:16] for m, v in mean_image_baseline(mean, splits).items()})
    assert optimised['psnr']['mean'] > baseline['psnr']['mean'] + 2, (optimised['psnr'], baseline['psnr'])
    assert optimised['ssim']['mean'] > baseline['ssim']['mean']


def test_optimisation_moves_only_the_image_and_towards_the_sent_tensor(tmp_path):
    attack, _ = build_attack(tiny_config(tmp_path, split='layer1', precision='fp32'), CPU)
    before = {k: v.clone() for k, v in attack.victim.state_dict().items()}
    images = torch.rand(4, 3, 32, 32)
    sent, start = attack.send(images), torch.full_like(images, 0.5)
    sent_before, start_before = sent.clone(), start.clone()

    def objective(x):  # the rMLE loss, written out here
        with torch.no_grad():
            error = (attack.victim.encode(x) - sent).pow(2).flatten(1).sum(1) / sent.pow(2).flatten(1).sum(1)
        return error + 0.3 * total_variation(x)
    recovered = invert_features(attack, sent, start, 20, 0.2, 0.3)
    assert recovered.shape == images.shape and 0 <= recovered.min() and recovered.max() <= 1
    assert (objective(recovered) < 0.5 * objective(start)).all()  # the gradient reached every image
    assert torch.equal(sent, sent_before) and torch.equal(start, start_before)
    assert all(torch.equal(before[k], v) for k, v in attack.victim.state_dict().items())  # weights, BN buffers
    assert not attack.victim.training and not any(p.requires_grad for p in attack.victim.parameters())


def test_harmless_dropout_and_topk_leave_the_tensor_unchanged():
    features = torch.randn(4, 8, 5, 5)
    assert torch.equal(DEFENCES['dropout'].transform(features, 0.0), features)
    assert torch.equal(DEFENCES['topk'].transform(features, 1.0), features)
    assert torch.equal(DEFENCES['topk'].transform(features, 200), features)


def test_dropout_zeroes_about_that_fraction_and_topk_keeps_the_largest():
    features = torch.randn(10, 64, 16, 16) + 5  # no zeros of its own
    dropped = DEFENCES['dropout'].transform(features, 0.3, torch.Generator().manual_seed(0))
    assert (dropped == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    survivors = dropped != 0
    assert torch.allclose(dropped[survivors], features[survivors] / 0.7)
    kept = DEFENCES['topk'].transform(features, 0.1)
    per_sample = (kept != 0).flatten(1).sum(1)
    assert per_sample.tolist() == [round(0.1 * 64 * 16 * 16)] * 10
    smallest_kept = kept.abs().flatten(1).masked_fill(kept.flatten(1) == 0, float('inf')).min(1).values
    largest_dropped = features.abs().flatten(1).masked_fill(kept.flatten(1) != 0, 0).max(1).values
    assert (smallest_kept >= largest_dropped).all()


def test_topk_sends_exactly_k_elements_even_when_magnitudes_tie():
    tied = torch.ones(2, 4, 3, 3)
    assert (DEFENCES['topk'].transform(tied, 5) != 0).flatten(1).sum(1).tolist() == [5, 5]
    rounded = torch.randn(6, 32, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    assert rounded[0].abs().unique().numel() < rounded[0].numel()  # bf16 rounding makes ties
    kept = DEFENCES['topk'].transform(rounded, 0.1)
    assert (kept != 0).flatten(1).sum(1).tolist() == [round(0.1 * 32 * 8 * 8)] * 6


def test_every_attack_receives_the_same_defended_tensor(tmp_path, monkeypatch, capsys):
    """Each evaluation (during training, after it, the attack sweep's rows, --attack optimize alone) scores the
    32 validation crops in two batches; every attack (those --attack all runs too) must get the same sent tensor for
    each batch."""
    received = record_recover(monkeypatch, evaluate_module, worst_case)  # worst_case: --attack all's
    monkeypatch.chdir(tmp_path)
    defences = ('--keep_channels', '0.5', '--defence', 'dropout', '--defence_p', '0.3', '--noise_at', 'features',
                '--train_noise', '--test_noise', '--test_noise_var', '0.05')
    common = (*TINY, '--attack_steps', '2', *defences, '--cache_dir', str(tmp_path / 'cache'))
    cli.main(['--sweep', 'attack', '--sweep_values', 'decoder', 'all', *common, '--save_dir', 'sweep'])
    cli.main(['--attack', 'optimize', *common, '--save_dir', 'alone'])
    cli.main(['--train', '--attack', 'decoder+optimize', *common, '--save_dir', 'train'])
    assert {kind for kind, _ in received} == {'decoder', 'optimize', 'decoder+optimize'}
    distinct = []
    for kind, sent in received:
        if not any(torch.equal(sent, other) for other in distinct):
            distinct.append(sent)
    assert len(distinct) == 2  # one tensor for each batch of 16, whatever the attack
    first = distinct[0]
    channels_sent = (first.abs().sum((0, 2, 3)) > 0).sum().item()
    assert channels_sent == 64  # half of resnet18's 128 at layer2
    with open(tmp_path / 'sweep' / 'sweep.csv') as f:
        assert [int(r['channels_sent']) for r in csv.DictReader(f)] == [64, 64]  # decoder, all


def test_optimize_alone_is_a_run_that_needs_no_decoder(tmp_path):
    result = run_cli(tmp_path, '--attack', 'optimize', '--attack_steps', '20', *TINY, '--save_dir', 'white_box')
    with open(tmp_path / 'white_box' / 'eval_optimize.json') as f:
        evaluation = json.load(f)
    assert evaluation['attack']['kind'] == 'optimize' and evaluation['attack']['steps'] == 20
    assert (tmp_path / 'white_box' / 'samples_optimize.png').is_file()
    assert (tmp_path / 'white_box' / 'eval_optimize_per_image.csv').is_file()
    assert "optimize attack (white-box rMLE with the victim's weights, no decoder) on 32 images" in result.stdout
    assert evaluation['attacker'] == "white-box rMLE with the victim's weights, no decoder"


@pytest.mark.parametrize('sweep, values, column, expected', [
    ('attack', ('decoder', 'optimize', 'decoder+optimize'), 'attack', ['decoder', 'optimize', 'decoder+optimize']),
    ('defence', ('none', 'dropout:0.5', 'topk:0.1'), 'defence', ['none', 'dropout', 'topk']),
])
def test_attack_and_defence_sweeps_write_the_comparison(tmp_path, sweep, values, column, expected):
    args = ('--sweep', sweep, '--sweep_values', *values, '--attack_steps', '10', *TINY, '--save_dir', 'cmp')
    run_cli(tmp_path, *args)
    for name in ('sweep.csv', 'sweep.md', 'sweep.png', 'sweep_samples.png'):
        assert (tmp_path / 'cmp' / name).is_file(), name
    with open(tmp_path / 'cmp' / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r[column] for r in rows] == expected
    if sweep == 'defence':
        assert float(rows[0]['top1_agreement']) == 1.0  # no defence, no cost
    else:  # the white-box attack alone trains nothing; the others share one trained decoder
        assert [r['epochs'] for r in rows] == [rows[0]['epochs'], '0', rows[0]['epochs']] and rows[0]['epochs'] != '0'
    again = run_cli(tmp_path, *args)
    assert again.stdout.count('already done') == len(values)
