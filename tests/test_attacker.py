"""The attacker's recipe: residual decoder, cosine schedule, losses, augmentation, EMA, the white-box term, the
wall-clock budget, LPIPS and the decoder sweep."""
import csv
import json
import os

import pytest
import torch
import torchvision
from pytorch_msssim import ssim

from conftest import tiny_config
from recon_attack import metrics
from recon_attack.attacks import build_attack, feature_error
from recon_attack.checkpoint import load_checkpoint
from recon_attack.config import DecoderSpec, Derived, TrainConfig
from recon_attack.models.decoders import build_decoder, resolve
from recon_attack.train import (AUGMENT_MIN_SCALE, MIX_SSIM_SHARE, augment, epochs_within, make_scheduler,
                                reconstruction_loss, train)

CPU = torch.device('cpu')


def test_residual_decoder_is_wide_where_the_tensor_arrives_and_narrows_to_the_image():
    spec = resolve(DecoderSpec(kind='residual', interpolation=None, depth='medium', width=128, blocks=3))
    assert spec.interpolation == 'transpose' and spec.norm == 'batch'
    decoder = build_decoder((64, 4, 4), 32, spec)
    widths = [stage[0].out_channels if i == 0 else stage[-1].body[0].in_channels
              for i, stage in enumerate(decoder.stages)]
    assert widths == [128, 64, 32, 32]  # halved per x2 stage, down to 32
    assert sum(type(m).__name__ == 'ResidualBlock' for m in decoder.stages[0]) == 3
    assert decoder(torch.randn(2, 64, 4, 4)).shape == (2, 3, 32, 32)
    assert 'width 128, 3 blocks' in spec.label()


def test_configurations_from_before_the_residual_decoder_rebuild_the_original_one():
    spec = resolve(DecoderSpec(interpolation='bicubic', depth='light'))
    assert spec.kind == 'original' and type(build_decoder((128, 4, 4), 32, spec)).__name__ == 'Decoder'


def test_cosine_schedule_warms_up_then_decays_to_zero_per_batch():
    training = TrainConfig(scheduler='cosine', num_epochs=4, warmup_epochs=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    scheduler = make_scheduler(training, optimizer, n_train=50, batch_size=10)  # 5 steps an epoch, 20 in all
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    assert rates[:5] == sorted(rates[:5]) and rates[0] < 0.03  # linear warm-up over the first epoch
    assert max(rates) == pytest.approx(0.1)
    assert rates[5:] == sorted(rates[5:], reverse=True) and rates[-1] < 0.002  # down to ~0 at the last step


def test_reconstruction_losses_are_the_ones_named():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    recon = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    l1 = (recon - images).abs().mean()
    dissimilarity = 1 - ssim(recon, images, data_range=1.0)
    assert reconstruction_loss(recon, images, 'mse').item() == pytest.approx((recon - images).pow(2).mean().item())
    assert reconstruction_loss(recon, images, 'l1').item() == pytest.approx(l1.item())
    assert reconstruction_loss(recon, images, 'ssim').item() == pytest.approx(dissimilarity.item(), rel=1e-5)
    mix = MIX_SSIM_SHARE * dissimilarity + (1 - MIX_SSIM_SHARE) * l1
    assert reconstruction_loss(recon, images, 'mix').item() == pytest.approx(mix.item(), rel=1e-5)
    for kind in ('mse', 'l1', 'ssim', 'mix'):
        assert reconstruction_loss(images, images, kind).item() == pytest.approx(0, abs=1e-5)


def test_augmentation_flips_and_crops_each_image_reproducibly():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32)
    first = augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(4)))
    assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1
    changed = [not torch.allclose(a, b) for a, b in zip(first, images)]
    assert sum(changed) >= 12
    # on a left-to-right ramp, a crop's span is the share of the side it kept: at least AUGMENT_MIN_SCALE
    ramp = torch.linspace(0, 1, 32).expand(16, 3, 32, 32)
    spans = [(row.max() - row.min()).item() for row in augment(ramp, torch.Generator().manual_seed(3))[:, 0, 16]]
    assert min(spans) >= AUGMENT_MIN_SCALE - 0.05 and min(spans) < 0.9


def test_feature_consistency_is_zero_for_the_true_image_and_leaves_the_victim_frozen(tmp_path):
    cfg = tiny_config(tmp_path, image_size=32, keep_channels=0.5)
    attack, _ = build_attack(cfg, CPU, derived=Derived(channel_indices=list(range(0, 128, 2))))
    before = {k: v.clone() for k, v in attack.victim.state_dict().items()}
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    sent = attack.send(images)
    assert feature_error(attack, images, sent).max() < 1e-6
    guess = torch.rand(4, 3, 32, 32, requires_grad=True)
    error = feature_error(attack, guess, sent)
    assert (error > 0.01).all()
    error.sum().backward()
    assert guess.grad.abs().sum() > 0  # it reaches the image through the victim...
    assert all(p.grad is None for p in attack.victim.parameters())  # ...which learns nothing
    assert all(torch.equal(before[k], v) for k, v in attack.victim.state_dict().items())


def test_white_box_training_names_itself_and_lowers_the_feature_error(tmp_path):
    results = {}
    for weight in (0.0, 1.0):
        cfg = tiny_config(tmp_path / str(weight), num_epochs=3, feature_weight=weight)
        attack, splits, *_ = train(cfg, CPU)
        images = attack.to_images(splits.images[splits.val_idx])
        with torch.no_grad():
            sent = attack.send(images)
            results[weight] = feature_error(attack, attack.decode(sent), sent).mean().item()
        config = load_checkpoint(os.path.join(cfg.outputs.save_dir, 'model.pth'))['config']
        assert config['feature_weight'] == weight
    assert results[1.0] < results[0.0]


def test_ema_checkpoints_attack_with_the_average_and_resume_with_the_raw_weights(tmp_path):
    cfg = tiny_config(tmp_path, num_epochs=2, ema=0.9)
    attack, splits, *_ = train(cfg, CPU)
    model = load_checkpoint(os.path.join(cfg.outputs.save_dir, 'model.pth'))
    ckpt = load_checkpoint(os.path.join(cfg.outputs.save_dir, 'ckpt_2.ckpt'), need_optimizer=True)
    for key, value in model['decoder'].items():
        assert torch.equal(value, attack.decoder.state_dict()[key])  # what was evaluated is what was saved
        assert torch.equal(value, ckpt['decoder'][key])
    raw = ckpt['trained_decoder']
    assert any(not torch.equal(raw[k], v) for k, v in model['decoder'].items() if v.is_floating_point())
    assert int(ckpt['average']['n_averaged']) == 2 * (len(splits.train_idx) // 16)  # every step of 2 epochs


def test_minutes_sets_the_epochs_from_the_first_one_and_records_them(tmp_path, capsys):
    assert epochs_within(1.0, 7.0) == 8  # 60 s // 7 s
    cfg = tiny_config(tmp_path, num_epochs=50, minutes=1e-4)
    history = train(cfg, CPU).history
    assert len(history) == 1
    assert 'so 1 epochs in all (--num_epochs 1 repeats this run)' in capsys.readouterr().out
    saved = json.load(open(os.path.join(cfg.outputs.save_dir, 'metrics.json')))['config']
    assert saved['num_epochs'] == 1 and saved['minutes'] == 1e-4


def test_lpips_is_skipped_with_one_line_when_its_weights_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    assert metrics.load_lpips(CPU) is None
    out = capsys.readouterr().out.strip()
    assert out.count('\n') == 0 and 'alexnet-owt-7be5be79.pth is missing' in out


def stand_in_backbone(tmp_path, monkeypatch):
    """A hub cache holding a seeded AlexNet state dict under torchvision's file name (no ImageNet AlexNet file can
    be had offline); returns the state dict."""
    checkpoints = tmp_path / 'home' / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, checkpoints / os.path.basename(metrics.LPIPS_BACKBONE.url))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'home'))
    return state


def test_lpips_refuses_a_backbone_that_is_not_torchvisions_file(tmp_path, monkeypatch, capsys):
    stand_in_backbone(tmp_path, monkeypatch)
    assert metrics.load_lpips(CPU) is None
    out = capsys.readouterr().out.strip()
    assert out.count('\n') == 0 and "is not torchvision's AlexNet file (its sha256 does not begin with" in out


@pytest.fixture
def lpips_home(tmp_path, monkeypatch):
    """The stand-in backbone with the digest check waived: enough to check the plumbing, not the scores."""
    state = stand_in_backbone(tmp_path, monkeypatch)
    monkeypatch.setattr(metrics, 'is_torchvision_file', lambda path: True)
    return state


def test_lpips_uses_the_hub_cache_backbone_and_scores_per_image(lpips_home):
    metric = metrics.load_lpips(CPU)
    assert torch.equal(metric.net.slice1[0].weight, lpips_home['features.0.weight'])
    assert torch.equal(getattr(metric.net.slice5, '10').weight, lpips_home['features.10.weight'])
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(0, 1)
    scores = metrics.score(noisy, images, metric)
    assert scores['lpips'].shape == (3,) and (scores['lpips'] > 0).all()
    assert metrics.score(images, images, metric)['lpips'].abs().max() < 1e-6


def test_decoder_sweep_compares_the_decoders_at_one_budget(tmp_path, main_here, lpips_home):
    result = main_here(tmp_path, '--sweep', 'decoder', '--sweep_values', 'original:transpose', 'residual',
                       '--image_size', '32', '--batch_size', '16', '--num_batches', '22', '--num_epochs', '2',
                       '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0', '--save_dir', 'sweep')
    assert result.returncode == 0, result.stderr
    with open(tmp_path / 'sweep' / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['decoder'] for r in rows] == ['original:transpose', 'residual']
    assert all(r['epochs'] == '2' and float(r['lpips']) > 0 for r in rows)
    table = (tmp_path / 'sweep' / 'sweep.md').read_text()
    assert 'original transpose decoder (light)' in table and 'residual transpose decoder (width 64, 0 blocks, batch norm)' in table
    for figure in ('sweep.png', 'sweep_time.png', 'sweep_samples.png'):
        assert (tmp_path / 'sweep' / figure).stat().st_size > 10_000
    configs = [json.load(open(tmp_path / 'sweep' / f'decoder={v}' / 'eval.json'))
               for v in ('original:transpose', 'residual')]
    assert [c['config']['decoder'] for c in configs] == ['original', 'residual']
    assert configs[0]['attacker'].startswith('black-box original transpose')


def test_checkpoints_from_before_the_residual_decoder_evaluate_as_they_were_trained(tmp_path, main_here):
    """A format-2 file (no --decoder and recipe settings) rebuilds the original decoder it was trained with."""
    cfg = tiny_config(tmp_path, decoder='original', interpolation='transpose', decoder_width=None,
                      decoder_blocks=None, num_epochs=1)
    train(cfg, CPU)
    state = torch.load(os.path.join(cfg.outputs.save_dir, 'model.pth'), weights_only=True)
    state['format'] = 'recon-attack/2'
    for key in ('decoder', 'decoder_width', 'decoder_blocks', 'decoder_norm', 'feature_weight', 'loss', 'augment',
                'ema', 'warmup_epochs', 'minutes'):
        del state['config'][key]
    torch.save(state, tmp_path / 'old.pth')
    result = main_here(tmp_path, '--eval', '--model_path', 'old.pth', '--save_dir', 'eval')
    assert result.returncode == 0, result.stderr
    assert 'black-box original transpose decoder (light)' in result.stdout
    history = json.load(open(os.path.join(cfg.outputs.save_dir, 'metrics.json')))['history']
    scored = json.load(open(tmp_path / 'eval' / 'eval.json'))['metrics']['psnr']['mean']
    assert scored == pytest.approx(history[-1]['psnr'], abs=1e-4)


def test_checkpoints_and_commands_under_renamed_flags_still_work_with_a_notice(tmp_path, main_here):
    """A checkpoint whose configuration has the old names (aug, defend, eval_pth, interpolation 'upsample') loads
    as the run it was; the old flags on the command line say their new names and do the same."""
    cfg = tiny_config(tmp_path, interpolation='bicubic', num_epochs=1)
    train(cfg, CPU)
    state = torch.load(os.path.join(cfg.outputs.save_dir, 'model.pth'), weights_only=True)
    config = state['config']
    config.update(aug=config.pop('train_noise'), defend=config.pop('train_defence'), eval_pth=False, eval_ckpt=False,
                  interpolation='upsample')  # as format 4 wrote them, with the mode flags
    torch.save(state, tmp_path / 'old.pth')
    result = main_here(tmp_path, '--eval_pth', '--model_path', 'old.pth', '--no-aug', '--save_dir', 'eval')
    assert result.returncode == 0, result.stderr
    assert 'note: --eval_pth is now --eval' in result.stderr
    assert 'note: --no-aug is now --no-train_noise' in result.stderr
    assert 'black-box original bicubic decoder (light)' in result.stdout
    history = json.load(open(os.path.join(cfg.outputs.save_dir, 'metrics.json')))['history']
    scored = json.load(open(tmp_path / 'eval' / 'eval.json'))
    assert scored['metrics']['psnr']['mean'] == pytest.approx(history[-1]['psnr'], abs=1e-4)
    assert 'aug' not in scored['config'] and scored['config']['interpolation'] == 'bicubic'


@pytest.mark.parametrize('flags,message', [
    (('--decoder', 'original', '--interpolation', 'pixelshuffle'), 'the original decoder upsamples by transpose or bicubic'),
    (('--decoder', 'original', '--decoder_width', '64'), '--decoder_width: for --decoder residual'),
    (('--ema', '1'), '--ema: a decay in [0, 1)'),
    (('--minutes', '0'), '--minutes: must be positive'),
    (('--feature_weight', '-1'), '--feature_weight: must not be negative'),
])
def test_bad_attacker_flags_get_one_line(tmp_path, main_here, flags, message):
    result = main_here(tmp_path, '--train', *flags)
    assert result.returncode == 2 and message in result.stderr
    assert 'Traceback' not in result.stderr
