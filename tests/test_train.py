import os

import pytest
import torch

from conftest import tiny_config
from evaluate import evaluate, evaluation_images, load_trained_attack, summarise
from train import train
from utils import load_checkpoint


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp('trained')
    cfg = tiny_config(tmp_path, num_epochs=4, log_interval=2)
    attack, splits, history, baselines = train(cfg, torch.device('cpu'))
    return cfg, attack, splits, history, baselines


def test_short_training_lowers_validation_loss(trained):
    _, _, _, history, baselines = trained
    untrained = baselines['untrained_decoder']['mse']['mean']
    assert history[-1]['val_loss'] < 0.6 * untrained
    assert history[-1]['val_loss'] < history[0]['val_loss']


def test_training_writes_checkpoints_with_the_full_configuration(trained):
    cfg = trained[0]
    for name in ('ckpt_2.ckpt', 'ckpt_4.ckpt', 'model.pth', 'metrics.json'):
        assert os.path.exists(os.path.join(cfg['save_dir'], name)), name
    state = load_checkpoint(os.path.join(cfg['save_dir'], 'ckpt_4.ckpt'), need_optimizer=True)
    for key in ('arch', 'split', 'pretrained', 'interpolation', 'decoder_depth', 'image_size', 'victim_fingerprint'):
        assert state['config'][key] == cfg[key]
    assert state['epoch'] == 4 and len(state['history']) == 4


@pytest.mark.parametrize('filename', ['model.pth', 'ckpt_4.ckpt'])
def test_evaluating_a_saved_file_reproduces_the_training_figures(trained, filename):
    cfg, attack, splits, history, _ = trained
    state = load_checkpoint(os.path.join(cfg['save_dir'], filename))
    loaded = load_trained_attack({**state['config'], 'model_path': filename}, state, torch.device('cpu'))
    for key, value in attack.decoder.state_dict().items():
        assert torch.equal(value, loaded.decoder.state_dict()[key])
    images, indices, _, _ = evaluation_images({**state['config'], 'cache_dir': cfg['cache_dir']}, state['config'])
    assert torch.equal(indices, splits.val_idx)
    summary = summarise(evaluate(loaded, images, indices, cfg['batch_size']))
    assert summary['psnr']['mean'] == pytest.approx(history[-1]['psnr'], abs=1e-4)
    assert summary['ssim']['mean'] == pytest.approx(history[-1]['ssim'], abs=1e-5)


def test_training_is_deterministic(tmp_path, trained):
    cfg = tiny_config(tmp_path, num_epochs=4, log_interval=2)
    _, _, history, _ = train(cfg, torch.device('cpu'))
    assert [h['val_loss'] for h in history] == pytest.approx([h['val_loss'] for h in trained[3]], rel=1e-5)
