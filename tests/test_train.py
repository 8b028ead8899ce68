import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from recon_attack.checkpoint import evaluation_images, load_checkpoint, load_trained_attack
from recon_attack.config import TrainConfig
from recon_attack.evaluate import evaluate
from recon_attack.metrics import summarise
from recon_attack.records import from_record, to_record
from recon_attack.train import make_optimizer, train, training_loss


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('trained')
    cfg = tiny_config(tmp_path, num_epochs=4, log_interval=2)
    attack, splits, history, baselines, *_ = train(cfg, torch.device('cpu'))
    return cfg, attack, splits, history, baselines


def test_short_training_lowers_validation_loss(trained):
    _, _, _, history, baselines = trained
    untrained = baselines['untrained_decoder']['mse']['mean']
    assert history[-1]['val_loss'] < 0.6 * untrained
    assert history[-1]['val_loss'] < history[0]['val_loss']


def test_training_writes_checkpoints_with_the_full_configuration(trained):
    config = trained[0]
    for name in ('ckpt_2.ckpt', 'ckpt_4.ckpt', 'model.pth', 'metrics.json'):
        assert os.path.exists(os.path.join(config.outputs.save_dir, name)), name
    state = load_checkpoint(os.path.join(config.outputs.save_dir, 'ckpt_4.ckpt'), need_optimizer=True)
    cfg = {**to_record(config), 'victim_fingerprint': trained[1].victim.fingerprint()}
    for key in ('arch', 'split', 'pretrained', 'interpolation', 'decoder_depth', 'image_size', 'victim_fingerprint'):
        assert state['config'][key] == cfg[key]
    assert state['epoch'] == 4 and len(state['history']) == 4


@pytest.mark.parametrize('filename', ['model.pth', 'ckpt_4.ckpt'])
def test_evaluating_a_saved_file_reproduces_the_training_figures(trained, filename):
    cfg, attack, splits, history, _ = trained
    state = load_checkpoint(os.path.join(cfg.outputs.save_dir, filename))
    loaded = load_trained_attack(state, torch.device('cpu'))
    for key, value in attack.decoder.state_dict().items():
        assert torch.equal(value, loaded.decoder.state_dict()[key])
    data = replace(from_record(state['config'])[0].data, cache_dir=cfg.data.cache_dir)
    images, indices, *_ = evaluation_images(data, state)
    assert torch.equal(indices, splits.val_idx)
    summary = summarise(evaluate(loaded, images, indices, cfg.data.batch_size))
    assert summary['psnr']['mean'] == pytest.approx(history[-1]['psnr'], abs=1e-4)
    assert summary['ssim']['mean'] == pytest.approx(history[-1]['ssim'], abs=1e-5)


def test_training_repeats_bit_for_bit_on_the_cpu(tmp_path, trained):
    """The README's claim, exactly: the same weights and the same history (all but the wall-clock seconds)."""
    cfg = tiny_config(tmp_path, num_epochs=4, log_interval=2)
    attack, _, history, *_ = train(cfg, torch.device('cpu'))
    first = trained[1].decoder.state_dict()
    assert all(torch.equal(value, first[key]) for key, value in attack.decoder.state_dict().items())
    without_time = [[{k: v for k, v in h.items() if k != 'seconds'} for h in run] for run in (history, trained[3])]
    assert without_time[0] == without_time[1]


@pytest.mark.parametrize('overrides', [{'interpolation': 'bicubic'}, {'train_noise': True, 'noise_var': 0.05},
                                       {'optim': 'sgd', 'lr': 0.05}, {'optim': 'adamw', 'weight_decay': 1.0},
                                       {'decoder': 'residual', 'interpolation': 'pixelshuffle', 'decoder_width': 32,
                                        'decoder_blocks': 1, 'decoder_norm': 'group'},
                                       # the slower objectives get a third epoch to show their gain over the seeds
                                       {'loss': 'mix', 'augment': True, 'num_epochs': 3},
                                       {'feature_weight': 1.0, 'ema': 0.5, 'loss': 'l1', 'num_epochs': 3}])
def test_other_decoders_noise_and_optimizers_train(tmp_path, trained, overrides):
    cfg = tiny_config(tmp_path, **{'num_epochs': 2, **overrides})
    _, _, history, baselines, *_ = train(cfg, torch.device('cpu'))
    assert history[-1]['train_loss'] < history[0]['train_loss']  # its own objective goes down
    untrained = baselines['untrained_decoder']
    if cfg.training.loss in ('ssim', 'mix'):  # a structural objective: SSIM improves first
        assert history[-1]['ssim'] > untrained['ssim']['mean'] + 0.02
    else:  # a pixel objective (with the white-box term pulling towards the features too)
        assert history[-1]['val_loss'] < (1.0 if cfg.training.feature_weight else 0.9) * untrained['mse']['mean']
    assert history[0]['train_loss'] != pytest.approx(trained[3][0]['train_loss'], rel=1e-5)  # not the default run


def test_optimizers_are_the_ones_asked_for():
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = make_optimizer(TrainConfig(optim='sgd', lr=0.1, weight_decay=0.01), params, torch.device('cpu'))
    assert type(sgd) is torch.optim.SGD and sgd.defaults['momentum'] == 0.9 and sgd.defaults['weight_decay'] == 0.01
    adamw = make_optimizer(TrainConfig(optim='adamw', lr=0.1, weight_decay=0.05), params, torch.device('cpu'))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults['weight_decay'] == 0.05


def test_sparse_adds_the_l1_penalty_on_the_activations():
    torch.manual_seed(0)
    recon, images = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    activations = [torch.randn(2, 4, 4, 4), torch.randn(2, 2, 8, 8)]
    plain = training_loss(None, recon, images, None, activations, TrainConfig(sparse_reg=0.5))
    sparse = training_loss(None, recon, images, None, activations, TrainConfig(sparse=True, sparse_reg=0.5))
    mse = ((recon - images) ** 2).mean()
    assert plain.item() == pytest.approx(mse.item())
    penalty = 0.5 * (activations[0].abs().mean() + activations[1].abs().mean())
    assert sparse.item() == pytest.approx((mse + penalty).item())
    assert F.mse_loss(recon, images).item() == pytest.approx(plain.item())
