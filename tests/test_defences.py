"""Channel-subset and noise defences, the victim's utility under them, and sweeps."""
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import run_cli, tiny_config
from recon_attack.attacks import build_attack
from recon_attack.checkpoint import load_checkpoint
from recon_attack.config import Derived, Noise
from recon_attack.data import load_splits
from recon_attack.defences import keep_count, select_channels
from recon_attack.evaluate import evaluate
from recon_attack.metrics import summarise
from recon_attack.models import IMAGENET_MEAN, IMAGENET_STD
from recon_attack.noise import generator, held_out_draws
from recon_attack.records import from_record, to_flags
from recon_attack.train import train

CPU = torch.device('cpu')


def test_keep_channels_is_a_fraction_or_a_count():
    assert keep_count(1, 128) == 128
    assert keep_count(0.25, 128) == 32
    assert keep_count(0.001, 128) == 1
    assert keep_count(24, 128) == 24


def test_channel_selection_rules():
    features = torch.randn(16, 8, 4, 4) * torch.tensor([1, 5, 2, 9, 1, 1, 7, 1.0]).view(1, 8, 1, 1)
    assert select_channels('first', 3, features) == [0, 1, 2]
    assert select_channels('topvar', 3, features) == [1, 3, 6]
    random_a, random_b = select_channels('random', 3, features, seed=1), select_channels('random', 3, features, seed=1)
    assert random_a == random_b and len(set(random_a)) == 3
    assert select_channels('random', 3, features, seed=2) != random_a


@pytest.mark.parametrize('how', ['random', 'topvar'])
def test_chosen_channels_are_deterministic_and_stored_in_the_checkpoint(tmp_path, how):
    runs = [tiny_config(tmp_path / str(i), num_epochs=1, keep_channels=0.25, channel_select=how) for i in range(2)]
    for cfg in runs:
        train(cfg, CPU)
    stored = [load_checkpoint(os.path.join(cfg.outputs.save_dir, 'model.pth'))['config']['channel_indices']
              for cfg in runs]
    assert stored[0] == stored[1] and len(stored[0]) == 32
    state = load_checkpoint(os.path.join(runs[0].outputs.save_dir, 'model.pth'))
    config, derived = from_record(state['config'])
    rebuilt, _ = build_attack(config, CPU, derived=derived)
    assert rebuilt.channel_mask.flatten().nonzero().flatten().tolist() == stored[0]


def test_dropped_channels_reach_the_server_as_exact_zeros(tmp_path):
    attack, _ = build_attack(tiny_config(tmp_path), CPU)
    kept = [3, 17, 64]
    attack.keep_only(kept, (128, 4, 4))
    images = torch.rand(4, 3, 32, 32)
    noise = Noise('features', 0.5, 1.0)
    sent = attack.send(images, noise, held_out_draws(range(4), CPU))
    dropped = [c for c in range(128) if c not in kept]
    assert torch.count_nonzero(sent[:, dropped]) == 0
    assert torch.count_nonzero(sent[:, kept]) == sent[:, kept].numel()


def genuine_victim(torch_home, monkeypatch, tmp_path, derived=Derived(), **overrides):
    """(attack, 32 built-in validation crops as uint8) with the genuine mobilenet_v2 cut at block6, in fp32."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(torch_home / 'hub'))
    cfg = tiny_config(tmp_path, arch='mobilenet_v2', split='block6', pretrained=True, image_size=64,
                      precision='fp32', **overrides)
    splits = load_splits(cfg.data)
    return build_attack(cfg, CPU, derived=derived)[0], splits.images[splits.val_idx[:32]]


def by_hand(clean_logits, defended_logits):
    """Agreement and KL(clean || defended) per image, written out from their definitions."""
    top1, top5, kl = [], [], []
    for clean, defended in zip(clean_logits.double(), defended_logits.double()):
        reference = int(clean.argmax())
        top1.append(float(int(defended.argmax()) == reference))
        top5.append(float(reference in defended.topk(5).indices.tolist()))
        p, q = clean.softmax(0), defended.softmax(0)
        kl.append(float((p * (p.log() - q.log())).sum()))
    return torch.tensor(top1), torch.tensor(top5), torch.tensor(kl, dtype=torch.float64)


def whole_network(torch_home):
    """The uncut torchvision mobilenet_v2 with its genuine weights: an independent reference for the split victim."""
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    state = torch.load(torch_home / 'hub' / 'checkpoints' / os.path.basename(weights.url), weights_only=True)
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(state)
    return net.eval()


def imagenet_normalised(x):
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def head(net, features):
    """mobilenet_v2 after block6: features[7:], pooling and the classifier."""
    return net.classifier(F.adaptive_avg_pool2d(net.features[7:](features), 1).flatten(1))


@torch.no_grad()
def test_utility_is_the_defended_victims_agreement_with_the_undefended_one(torch_home, monkeypatch, tmp_path):
    net = whole_network(torch_home)
    attack, images = genuine_victim(torch_home, monkeypatch, tmp_path, defence='topk', defence_k=0.5)
    normalised = imagenet_normalised(images.float() / 255)
    features = net.features[:7](normalised)
    flat = features.flatten(1)
    keep = flat.abs().topk(flat.shape[1] // 2, dim=1).indices
    defended = torch.zeros_like(flat).scatter(1, keep, flat.gather(1, keep)).view_as(features)
    expected = by_hand(net(normalised), head(net, defended))
    measured = evaluate(attack, images, torch.arange(32), 16, utility=True)
    assert measured['top1_agreement'].tolist() == expected[0].tolist()
    assert measured['top5_agreement'].tolist() == expected[1].tolist()
    assert torch.allclose(measured['kl'].double(), expected[2], rtol=1e-3, atol=1e-4)
    assert 0 < expected[0].mean() < 1 and expected[2].mean() > 0.1  # this defence costs something to measure
    attack.on_tensor = []
    undefended = evaluate(attack, images, torch.arange(32), 16, utility=True)
    assert undefended['top1_agreement'].mean() == 1 and undefended['kl'].abs().max() < 1e-6


@torch.no_grad()
def test_input_noise_is_charged_against_the_clean_image(torch_home, monkeypatch, tmp_path):
    net = whole_network(torch_home)
    attack, images = genuine_victim(torch_home, monkeypatch, tmp_path)
    x = images.float() / 255
    # each image's test noise from its own stream, seeded by its position among the scored images
    noisy = torch.stack([image + math.sqrt(0.02) * torch.randn(image.shape, generator=generator('test noise', i))
                         for i, image in enumerate(x)])
    expected = by_hand(net(imagenet_normalised(x)), net(imagenet_normalised(noisy)))
    measured = evaluate(attack, images, torch.arange(32), 16, Noise('input', 0.0, 0.02), utility=True)
    assert measured['top1_agreement'].tolist() == expected[0].tolist()
    assert torch.allclose(measured['kl'].double(), expected[2], rtol=1e-3, atol=1e-4)
    assert expected[2].mean() > 1e-3


def test_utility_logits_are_fp32_even_under_bf16_autocast(tmp_path):
    attack, _ = build_attack(tiny_config(tmp_path), CPU)
    attack.bf16 = True  # as on hardware with bf16 arithmetic, whatever this machine has
    features = torch.randn(4, 128, 4, 4)
    with torch.no_grad():
        assert torch.equal(attack.classify(features), attack.victim.classify(features))


def test_harsh_defences_cost_the_genuine_victim_its_predictions(torch_home, monkeypatch, tmp_path):
    attack, images = genuine_victim(torch_home, monkeypatch, tmp_path, Derived(channel_indices=[0]),
                                    keep_channels=1 / 32)
    summary = summarise(evaluate(attack, images, torch.arange(32), 16, utility=True))
    assert summary['top1_agreement']['mean'] < 0.5 and summary['kl']['mean'] > 0.5
    attack.channel_mask = None
    noisy = summarise(evaluate(attack, images, torch.arange(32), 16, Noise('features', 0.0, 25.0), utility=True))
    assert noisy['top1_agreement']['mean'] < 0.5


def test_a_sweep_writes_its_table_and_figures_and_resumes(tmp_path):
    args = ('--sweep', 'keep_channels', '--sweep_values', '1', '0.25', '--image_size', '32', '--batch_size', '16',
            '--num_batches', '22', '--num_epochs', '1', '--decoder_depth', 'light', '--num_samples', '2',
            '--num_workers', '0', '--save_dir', 'sweep')
    run_cli(tmp_path, *args)
    folder = tmp_path / 'sweep'
    for name in ('sweep.csv', 'sweep.md', 'sweep.png', 'sweep_samples.png'):
        assert (folder / name).is_file(), name
    with open(folder / 'sweep.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['keep_channels'] for r in rows] == ['1', '0.25']
    assert [int(r['channels_sent']) for r in rows] == [128, 32]
    assert '| keep_channels | tensor | channels sent | epochs | training (min) | PSNR (dB)' in (folder / 'sweep.md').read_text()

    first_model = (folder / 'keep_channels=1' / 'model.pth').read_bytes()
    os.remove(folder / 'keep_channels=0.25' / 'eval.json')  # as if the sweep had been stopped during that value
    result = run_cli(tmp_path, *args)
    assert 'sweep keep_channels 1/2: 1 already done' in result.stdout
    assert 'sweep keep_channels 2/2: keep_channels=0.25' in result.stdout
    assert (folder / 'keep_channels=1' / 'model.pth').read_bytes() == first_model
    assert 'not re-run: 1.' in (folder / 'sweep.md').read_text()
    with open(folder / 'sweep.csv') as f:
        assert [r['psnr'] for r in csv.DictReader(f)][0] == rows[0]['psnr']


def test_every_defence_and_noise_sweep_value_sets_only_flags_that_exist(tmp_path):
    """A defence switched on by a sweep or a preset must set the flags the run reads: the noise defence trains its
    attacker with the very noise it is measured with (an attacker trained without it would flatter the defence)."""
    from recon_attack.defences import DEFENCES
    from recon_attack.records import with_flags
    from recon_attack.sweep import Sweep
    cfg = tiny_config(tmp_path)
    for defence in DEFENCES.values():
        unknown = set(defence.settings(0.5)) - set(to_flags(cfg))
        assert not unknown, f'{defence.name} sets flags that do not exist: {unknown}'
    noised = with_flags(cfg, **DEFENCES['noise'].settings(0.1)).noise
    assert noised.training() == noised.testing() == Noise('features', 0.0, 0.1)
    for sweep, value in (('noise_var', 0.1), ('defence', 'noise:0.1')):
        run = Sweep(with_flags(cfg, noise_at='features'), sweep, [value]).run(value)
        assert run.noise.training() == run.noise.testing() == Noise('features', 0.0, 0.1)
