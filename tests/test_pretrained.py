"""--use_pretrained through torchvision's hub cache, with genuine ImageNet weights and without a network."""
import urllib.error

import pytest
import torch

from recon_attack.data import sample_photo, square_crop
from recon_attack import cut
from recon_attack.utils import UsageError

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


@pytest.fixture
def no_download(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f'offline test: no download of {url}')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)


def test_genuine_mobilenet_v2_weights_load_from_the_hub_cache(torch_home, no_download, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(torch_home / 'hub'))
    victim = cut('mobilenet_v2', 'block6', pretrained=True)
    image = square_crop(sample_photo('grace_hopper.jpg'), 224)[None].float() / 255
    with torch.no_grad():
        logits = victim.classify(victim.encode(image))
    assert logits.argmax(1).item() == MILITARY_UNIFORM
    random_victim = cut('mobilenet_v2', 'block6', pretrained=False)
    assert victim.fingerprint() != random_victim.fingerprint()


def test_missing_weights_name_the_file_and_the_cache(tmp_path, no_download, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    with pytest.raises(UsageError, match=r'mobilenet_v2-b0353104\.pth.*hub.*checkpoints'):
        cut('mobilenet_v2', 'block6', pretrained=True)


def test_cli_trains_against_the_pretrained_victim(torch_home, cli, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    result = cli('--train', '--arch', 'mobilenet_v2', '--use_pretrained', '--image_size', '32', '--batch_size', '16',
                 '--num_batches', '22', '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2',
                 '--save_dir', 'run')
    assert 'random-initialised' not in result.stdout
    state = torch.load(tmp_path / 'run' / 'model.pth', weights_only=True)
    assert state['config']['pretrained'] is True
