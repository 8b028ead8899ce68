"""Any victim, any cut: every family of torchvision classifiers, every legal cut of a ViT, a ConvNeXt and a Swin, the
layouts of what a cut sends, refused cuts, and a network of the researcher's own from a file."""
import json

import pytest
import torch
import torchvision

from conftest import tiny_config
from recon_attack import cut
from recon_attack.attacks import SplitAttack, build_attack, invert_features
from recon_attack.config import DecoderSpec, VictimConfig
from recon_attack.data import load_splits
from recon_attack.defences import DEFENCES
from recon_attack.evaluate import evaluate
from recon_attack.models import IMAGENET_MEAN, IMAGENET_STD, build_decoder, layout_of
from recon_attack.models.cuts import Graph, default_split, list_splits, probe
from recon_attack.models.victims import SplitVictim, load_network, normalisation
from recon_attack.train import Budget, EpochPlan, make_optimizer, train_one_epoch
from recon_attack.utils import UsageError

CPU = torch.device('cpu')
# One classifier of each torchvision family, at the smallest side its middle cut decodes at (MaxViT runs at 224 only;
# Inception v3 from 75 px).
FAMILIES = {'alexnet': 64, 'convnext_tiny': 32, 'densenet121': 32, 'efficientnet_b0': 32, 'efficientnet_v2_s': 32,
            'googlenet': 32, 'inception_v3': 96, 'maxvit_t': 224, 'mnasnet0_5': 32, 'mobilenet_v3_small': 32,
            'regnet_x_400mf': 32, 'resnext50_32x4d': 32, 'shufflenet_v2_x0_5': 32, 'squeezenet1_1': 32,
            'swin_t': 32, 'vgg11': 32, 'vit_b_16': 32}
NET = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.block = Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.down(self.block(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def make():
    return Net()


class Obfuscated(Net):
    def __init__(self):
        super().__init__()
        self.obfuscate = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.head(self.down(self.block(self.obfuscate(torch.relu(self.stem(x))))).mean((2, 3)))


def defended():
    return Obfuscated()
'''


@pytest.mark.parametrize('arch, size', FAMILIES.items())
def test_every_family_lists_its_cuts_and_trains_and_evaluates_a_batch_at_a_middle_cut(tmp_path, arch, size):
    """Each family's default cut (the legal one nearest the middle of its graph): its cuts listed, one training step
    of the decoder, and the evaluation of a batch with the victim's utility (undefended: full agreement)."""
    victim = VictimConfig(arch, None)
    assert '(default)' in list_splits(victim, size)
    config = tiny_config(tmp_path, arch=arch, split=default_split(victim, size), image_size=size, batch_size=4,
                         num_batches=2, precision='fp32')
    splits = load_splits(config.data)
    attack, derived = build_attack(config, CPU)
    optimizer = make_optimizer(config.training, attack.decoder.parameters(), CPU)
    loss = train_one_epoch(attack, splits, None, EpochPlan(config.training, 4, None, Budget(1)), optimizer, 0)
    measured = evaluate(attack, splits.images, splits.val_idx, 4, utility=True)
    assert torch.isfinite(torch.tensor(loss)) and measured['psnr'].shape == (4,)
    assert measured['top1_agreement'].mean() == 1 and measured['kl'].abs().max() < 1e-4


@pytest.mark.parametrize('arch', ['vit_b_16', 'convnext_tiny', 'swin_t'])
def test_every_legal_cut_decodes_and_inverts(arch):
    """Every cut --list_splits lists, in whatever layout it sends (tokens, channels-last maps, maps, vectors): a
    decoder reaches the image from it, two steps of the white-box optimisation move the image, the server's half
    classifies it, and the two halves are the whole network."""
    victim = VictimConfig(arch, None)
    cuts, _ = probe(victim, 32)
    net, _ = load_network(victim, 32)
    graph = Graph(net, arch)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        whole = net((images - mean) / std)
    kinds = set()
    for info in cuts:
        halves = SplitVictim(*graph.halves(info.node))
        with torch.no_grad():
            sent = halves.encode(images)
            torch.testing.assert_close(halves.classify(sent), whole, rtol=1e-4, atol=1e-4, msg=info.node)
        assert tuple(sent.shape[1:]) == info.shape, info.node
        attack = SplitAttack(halves, build_decoder(info.shape, 32, DecoderSpec(depth='light')), CPU)
        with torch.no_grad():
            assert attack.decode(sent).shape == images.shape, info.node
        start = torch.full_like(images, 0.5)
        assert not torch.equal(invert_features(attack, sent, start, 2, 0.2, 0.3), start), info.node
        kinds.add(info.layout.kind)
    expected = {'vit_b_16': {'tokens', 'vector'}, 'convnext_tiny': {'map', 'channels-last', 'vector'},
                'swin_t': {'map', 'channels-last', 'vector'}}
    assert kinds == expected[arch]


def test_the_layouts_read_as_maps_without_losing_a_value():
    tokens = torch.randn(2, 17, 8)  # a class token and a 4x4 grid
    layout = layout_of((17, 8))
    grid = layout.to_map(tokens)
    assert layout.kind == 'tokens' and layout.class_token and grid.shape == (2, 16, 4, 4)
    assert torch.equal(grid[:, :8].flatten(2).transpose(1, 2), tokens[:, 1:])  # each cell where it was
    assert torch.equal(grid[:, 8:, 2, 3], tokens[:, 0])  # the class token beside every cell
    assert layout_of((16, 8)).to_map(tokens[:, 1:]).shape == (2, 8, 4, 4)
    channels_last = torch.randn(2, 4, 4, 6)
    assert torch.equal(layout_of((4, 4, 6)).to_map(channels_last), channels_last.permute(0, 3, 1, 2))
    assert layout_of((6,)).to_map(torch.randn(2, 6)).shape == (2, 6, 1, 1)
    assert layout_of((15, 8)) is None and layout_of((3, 4, 5)) is None
    for sent in (tokens, channels_last):  # the elementwise defences act on any layout
        assert (DEFENCES['topk'].transform(sent, 0.25) != 0).flatten(1).sum(1).tolist() == [sent[0].numel() // 4] * 2
        dropped = DEFENCES['dropout'].transform(sent, 0.5, torch.Generator().manual_seed(0))
        assert dropped.shape == sent.shape and 0.3 < (dropped == 0).float().mean() < 0.7


def test_kept_channels_of_a_token_sequence_are_its_features(tmp_path):
    config = tiny_config(tmp_path, arch='vit_b_16', split='encoder.layers.encoder_layer_1', keep_channels=0.25,
                         channel_select='first')
    attack, derived = build_attack(config, CPU, torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    sent = attack.send(torch.rand(2, 3, 32, 32))
    assert derived.channel_indices == list(range(192)) and sent.shape == (2, 5, 768)
    assert torch.count_nonzero(sent[..., 192:]) == 0 and torch.count_nonzero(sent[..., :192]) == sent[..., :192].numel()


@pytest.mark.parametrize('arch, split, message', [
    ('resnet18', 'layer2.0.conv1', 'not cut in two at layer2.0.conv1 (the server\'s half would need an earlier '
                                   'tensor too, e.g. a skip connection); the nearest cuts are layer1 and layer2.0.add'),
    ('vit_b_16', 'encoder.layers.encoder_layer_2.mlp', 'the nearest cuts are encoder.layers.encoder_layer_2.add and '
                                                        'encoder.layers.encoder_layer_2 (--list_splits'),
    ('convnext_tiny', 'features.9', 'no such node or module in convnext_tiny\'s graph'),
    ('resnet18', 'layer9', "invalid choice for resnet18: 'layer9' (choose from layer1, layer2, layer3, layer4"),
])
def test_a_cut_that_does_not_cut_the_network_in_two_is_one_line(tmp_path, main_here, arch, split, message):
    result = main_here(tmp_path, '--train', '--arch', arch, '--split', split, '--image_size', '32')
    assert result.returncode == 2 and message in result.stderr and 'Traceback' not in result.stderr


def test_the_old_names_cut_where_they_always_did():
    """layer2 of a ResNet and block6 of a MobileNetV2: the stem and the stages before, as the tool cut them before
    it cut graphs (old checkpoints' victims are the same tensors)."""
    images = torch.rand(2, 3, 64, 64)
    for arch, split, device_half in (('resnet18', 'layer2', lambda n, x: n.layer2(n.layer1(n.maxpool(n.relu(
            n.bn1(n.conv1(x))))))), ('mobilenet_v2', 'block6', lambda n, x: n.features[:7](x))):
        victim = cut(arch, split, seed=3)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            net = torchvision.models.get_model(arch, weights=None).eval()
        with torch.no_grad():
            expected = device_half(net, (images - victim.mean) / victim.std)
            torch.testing.assert_close(victim.encode(images), expected, rtol=0, atol=0)


def test_list_splits_prints_a_vits_encoder_layers(tmp_path, main_here):
    result = main_here(tmp_path, '--list_splits', '--arch', 'vit_b_16', '--image_size', '64')
    assert result.returncode == 0, result.stderr
    for layer in range(12):  # the last also the last node of the encoder's layers
        module = 'encoder.layers' if layer == 11 else f'encoder.layers.encoder_layer_{layer}'
        assert f'{module} [encoder.layers.encoder_layer_{layer}.add_1]: 17x768 tokens' in result.stdout, layer
    assert result.stdout.count('(default)') == 1 and 'vit_b_16 at 64 px: 30 cuts' in result.stdout
    assert not (tmp_path / 'results').exists()  # it lists and exits


def test_a_pretrained_vit_runs_at_another_size_with_its_position_embeddings_interpolated(monkeypatch):
    """torchvision's ViT weights are for 224 px; at 64 px the position embeddings of its 14x14 grid are interpolated
    to 4x4 (stand-in weights: a seeded random ViT's, as no genuine file can be had offline)."""
    torch.manual_seed(0)
    state = torchvision.models.vit_b_16().state_dict()
    positions, projection = state['encoder.pos_embedding'].clone(), state['conv_proj.weight'].clone()
    weights = torchvision.models.get_model_weights('vit_b_16').IMAGENET1K_V1
    monkeypatch.setattr(type(weights), 'get_state_dict', lambda self, progress=True: dict(state))
    net, _ = load_network(VictimConfig('vit_b_16', 'encoder', pretrained=True), 64)
    assert net.encoder.pos_embedding.shape == (1, 17, 768) and positions.shape == (1, 197, 768)
    assert torch.equal(net.encoder.pos_embedding[:, 0], positions[:, 0])  # the class token's
    assert torch.equal(net.conv_proj.weight, projection)


def test_normalisation_is_imagenets_none_or_given():
    assert normalisation('imagenet')[0] == (0.485, 0.456, 0.406)
    assert normalisation('none') == ((0.0,) * 3, (1.0,) * 3)
    assert normalisation('0.5,0.25') == ((0.5,) * 3, (0.25,) * 3)
    assert normalisation('0.1,0.2,0.3,1,2,3') == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ('0.5', 'a,b', '0,0'):
        with pytest.raises(UsageError, match='--normalize'):
            normalisation(bad)


def test_a_network_from_a_file_is_attacked_end_to_end_and_never_imported_unnamed(tmp_path, main_here):
    (tmp_path / 'net.py').write_text(NET)
    common = ('--image_size', '32', '--batch_size', '16', '--num_batches', '6', '--num_epochs', '1',
              '--decoder_depth', 'light', '--num_samples', '2', '--num_workers', '0', '--normalize', 'none')
    inside = main_here(tmp_path, '--train', '--victim', 'net.py:make', '--split', 'block.conv1', *common)
    assert inside.returncode == 2 and 'Traceback' not in inside.stderr
    assert 'not cut in two at block.conv1' in inside.stderr
    assert 'the nearest cuts are relu and block.add' in inside.stderr
    trained = main_here(tmp_path, '--train', '--victim', 'net.py:make', '--split', 'block', '--attack',
                        'decoder+optimize', '--attack_steps', '2', '--keep_channels', '0.5', *common,
                        '--save_dir', 'run')
    assert trained.returncode == 0, trained.stderr
    record = json.loads((tmp_path / 'run' / 'eval_decoder_optimize.json').read_text())['config']
    assert record['victim'] == f'{tmp_path / "net.py"}:make' and record['arch'] is None
    assert record['sent_shape'] == [16, 16, 16] and len(record['victim_digest']) == 64
    unnamed = main_here(tmp_path, '--eval', '--model_path', 'run/model.pth')
    assert unnamed.returncode == 2 and 'name it again with --victim' in unnamed.stderr
    (tmp_path / 'elsewhere').mkdir()  # from another folder: the same file by another path
    again = main_here(tmp_path / 'elsewhere', '--eval', '--model_path', '../run/model.pth', '--victim',
                      '../net.py:make',
                      '--save_dir', 'again')
    assert again.returncode == 0, again.stderr
    scored = json.loads((tmp_path / 'elsewhere' / 'again' / 'eval_decoder_optimize.json').read_text())
    assert scored['held_out'] == json.loads((tmp_path / 'run' / 'eval_decoder_optimize.json').read_text())['held_out']
    charged = main_here(tmp_path, '--train', '--victim', 'net.py:defended', '--split', 'block', '--reference',
                        'net.py:make', *common, '--save_dir', 'charged')  # a defence that changed the architecture
    assert charged.returncode == 0, charged.stderr
    evaluation = json.loads((tmp_path / 'charged' / 'eval.json').read_text())
    assert evaluation['config']['victim_defence'] == (f'your defence: --victim {tmp_path / "net.py"}:defended, '
                                                      f'charged against --reference {tmp_path / "net.py"}:make')
    assert evaluation['metrics']['kl']['mean'] > 0 and 'original victim' in evaluation['utility']
    (tmp_path / 'net.py').write_text(NET + '\n# changed\n')
    changed = main_here(tmp_path, '--eval', '--model_path', 'run/model.pth', '--victim', 'net.py:make')
    assert changed.returncode == 2 and 'its file changed since this run was trained' in changed.stderr


def test_defences_attacks_and_the_bound_at_a_vits_tokens(tmp_path, main_here):
    """A ViT's token sequence through everything that acts on a sent tensor: channels kept (token features), noise
    on the tensor with its bound, the feature-consistency term, the refinement, a trained defence."""
    common = ('--arch', 'vit_b_16', '--split', 'encoder.layers.encoder_layer_1', '--image_size', '32', '--batch_size',
              '16', '--num_batches', '4', '--num_workers', '0', '--num_samples', '2')
    attacked = main_here(tmp_path, '--train', *common, '--num_epochs', '1', '--decoder_depth', 'light',
                         '--keep_channels', '0.5', '--noise_at', 'features', '--train_noise', '--test_noise',
                         '--test_noise_var', '0.1', '--feature_weight',
                         '1', '--attack', 'decoder+optimize', '--attack_steps', '2', '--save_dir', 'attacked')
    assert attacked.returncode == 0, attacked.stderr
    record = json.loads((tmp_path / 'attacked' / 'eval_decoder_optimize.json').read_text())
    assert record['config']['sent_shape'] == [5, 768] and len(record['config']['channel_indices']) == 384
    assert 'psnr_ceiling' in record['metrics'] and 'kl' in record['metrics']  # (a random ViT's head is all zeros)
    assert (tmp_path / 'attacked' / 'feature_maps.png').is_file()  # the tokens drawn on their grid
    defended = main_here(tmp_path, '--train_defence', 'adversarial', *common, '--defend_epochs', '1',
                         '--save_dir', 'defended')
    assert defended.returncode == 0, defended.stderr
    assert json.loads((tmp_path / 'defended' / 'defence.json').read_text())['sent_shape'] == [5, 768]
