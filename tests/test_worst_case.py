"""--attack all: every attack on the same sent tensor, each image's worst case over them, and the attacker's own
pick."""
import csv
import json

import pytest
import torch

from conftest import record_recover, run_cli, tiny_config
from recon_attack import worst_case
from recon_attack.attacks import build_attack, feature_error, received
from recon_attack.config import AttackPlan
from recon_attack.data import load_splits
from recon_attack.utils import to_unit

CPU = torch.device('cpu')
TINY = ('--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '1',
        '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0', '--attack_steps', '3')


def test_the_worst_case_is_each_metric_at_its_most_leaking_attack_and_the_pick_needs_no_image(tmp_path,
                                                                                                monkeypatch):
    attack, _ = build_attack(tiny_config(tmp_path), CPU)
    splits = load_splits(tiny_config(tmp_path).data)
    target = to_unit(splits.images[splits.val_idx[:6]])
    _, sent = received(attack, target, range(6))
    seen = record_recover(monkeypatch, worst_case)
    figures, rows = worst_case.run_all(attack, sent, AttackPlan(kind='all', steps=3), target)
    kinds = ['decoder', 'optimize', 'decoder+optimize']
    assert [k for k, _ in seen] == kinds and all(torch.equal(s, sent) for _, s in seen)  # one tensor for all
    for metric in ('psnr', 'ssim', 'ms_ssim'):
        each = torch.stack([figures[f'{k}:{metric}'] for k in kinds])
        assert torch.equal(figures[metric], each.amax(0))
        assert (figures[metric] >= each).all()
    assert torch.equal(figures['mse'], torch.stack([figures[f'{k}:mse'] for k in kinds]).amin(0))
    distances = torch.stack([feature_error(attack, rows[k], sent) for k in kinds])
    picked = distances.argmin(0)
    assert torch.equal(figures["attacker's pick:attack"], picked.float())
    for i, k in enumerate(picked.tolist()):
        assert figures["attacker's pick:psnr"][i] == figures[f'{kinds[k]}:psnr'][i]
        assert torch.equal(rows["attacker's pick"][i], rows[kinds[k]][i])
    best = torch.stack([figures[f'{k}:psnr'] for k in kinds]).argmax(0)
    for i, k in enumerate(best.tolist()):
        assert torch.equal(rows[worst_case.WORST_ROW][i], rows[kinds[k]][i])


def test_without_a_decoder_all_is_the_attacks_that_need_none():
    assert worst_case.attacks_in('all', has_decoder=False) == ['optimize']
    assert worst_case.attacks_in('decoder+optimize') == ['decoder+optimize']


@pytest.fixture(scope='module')
def all_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('all')
    result = run_cli(folder, '--train', *TINY, '--attack', 'all', '--save_dir', 'run')
    return folder, result


def test_attack_all_writes_each_attack_and_the_worst_case_per_image(all_run):
    folder, result = all_run
    run = folder / 'run'
    evaluation = json.loads((run / 'eval_all.json').read_text())
    assert evaluation['attacks_run'] == ['decoder', 'optimize', 'decoder+optimize']
    assert set(evaluation['attacks']) == {'decoder', 'optimize', 'decoder+optimize', "attacker's pick"}
    assert 'oracle' in evaluation['worst_case_note']
    for kind in ('decoder', 'optimize', 'decoder+optimize'):
        assert evaluation['metrics']['psnr']['mean'] >= evaluation['attacks'][kind]['psnr']['mean']
    assert sum(evaluation['shares']['highest_psnr'].values()) == pytest.approx(1.0)
    with open(run / 'eval_all_per_image.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == evaluation['n_images']
    for row in rows:
        for kind in ('decoder', 'optimize', 'decoder+optimize', "attacker's pick"):
            assert float(row['psnr']) >= float(row[f'{kind}:psnr'])
            assert float(row['ssim']) >= float(row[f'{kind}:ssim'])
    decoder = json.loads((run / 'eval.json').read_text())  # the decoder alone, scored on the same tensor
    assert evaluation['attacks']['decoder']['psnr']['mean'] == pytest.approx(decoder['metrics']['psnr']['mean'],
                                                                            abs=1e-4)
    assert (run / 'samples_all.png').is_file()
    assert "all attack (the worst case per image over the decoder" in result.stdout
    assert 'an oracle over attacks that needs the image' in result.stdout


def test_a_report_takes_the_worst_case_like_any_attack(all_run):
    folder, _ = all_run
    run_cli(folder, '--report', 'run', '--save_dir', 'report')
    table = (folder / 'report' / 'report.md').read_text()
    assert '| all |' in table and '| decoder |' in table
