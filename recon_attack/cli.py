"""recon-attack: how much of a private image leaks from the features a split-inference device sends.

The command line (main.py, the recon-attack console script): it parses flags, resolves them against a checkpoint,
builds the run's configuration (config.Config) once, and dispatches."""
import argparse
import copy
import difflib
import math
import os
import re
import shlex
import sys
from dataclasses import replace
from typing import NamedTuple

import torch
import torchvision

from . import defences
from .attacks import ATTACKS, build_attack
from .checkpoint import (checkpoint_epochs, evaluation_images, load_checkpoint, load_trained_attack, mean_image,
                         training_splits)
from .evaluate import PRIOR_IMAGES, mean_training_image, run_bound
from .config import AttackPlan, Config, DecoderSpec, Derived
from .data import load_splits
from .defence_training import train_defence
from .distributed import init_distributed, is_main_process, rank_and_world, same_on_all_processes
from .models.cuts import DEFAULT_SPLIT, SPLITS, check_cut, cut_at, default_split, list_splits, victim_name
from .models.decoders import DECODER_DEPTHS, DECODERS, INTERPOLATIONS, NORMS, RESIDUAL_DEPTHS, check
from .models.victims import is_entry_point, normalisation, victim_label
from .noise import noise_line
from .records import RENAMED_FLAGS, from_flags, from_record, idle_flags as record_idle_flags, renamed_value
from .report import write_report
from .sweep import SWEEPS, run_seeds, run_sweep
from .train import LOSSES, train_and_evaluate
from .utils import RunError, UsageError, fresh_run_dir, make_deterministic, pick_device
from .visualize import draw_all, run_attack

# Flags that define the attack's model: they must agree with a checkpoint that is being loaded.
MODEL_KEYS = ('arch', 'split', 'pretrained', 'victim', 'normalize', 'decoder', 'interpolation', 'decoder_depth',
              'decoder_width', 'decoder_blocks', 'decoder_norm', 'image_size', 'noise_for_bound', 'bound_quantile',
              'noise_snr') + defences.FIXED_KEYS
MODES = ('train', 'resume', 'eval', 'visualize', 'sweep', 'train_defence', 'report', 'list_splits')
# Modes that write a new record: into a fresh folder beside a --save_dir that holds one (unless --overwrite).
NEW_RECORDS = ('train', 'attack', 'train_defence', 'report', 'eval')
# Settings of how a run is carried out, not of what it computes: they may differ from a checkpoint's (resume,
# evaluation). COMMAND_KEYS always come from the command at hand (a loaded checkpoint never sets them); the rest of
# RUN_KEYS from the checkpoint unless given.
COMMAND_KEYS = frozenset({'model_path', 'device', 'save_dir', 'overwrite', 'num_samples', 'num_workers',
                          'cache_dir', 'eval_split'})
RUN_KEYS = COMMAND_KEYS | {'feature_cache_gb', 'log_interval', 'compile', 'deterministic', 'tensorboard'}
BUILTIN_IMAGE_SIZE, USER_IMAGE_SIZE = 64, 320
PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'presets')
PRESET_SUFFIX = '.args'
RENAMED_PRESETS = {'strongest': 'adamw_cosine'}  # old name -> new: the old one still works, with a notice
USAGE = 'main.py MODE [flags]   (MODE: ' + ' | '.join('--' + m for m in MODES) + ' | --attack optimize)'
START = ('start with:  python main.py --train --split layer1 --attack decoder+optimize --num_epochs 6 --batch_size 16\n'
         '            (the built-in photos, offline, a few minutes on a CPU; README.md says what it shows)\n'
         'every flag:  python main.py --help;  README.md and docs/ explain the rest')
EXAMPLES = '''examples:
  python main.py --train --split layer1 --attack decoder+optimize     # the leak on the built-in photos
  python main.py --train --data_dir ~/data/celeba --arch mobilenet_v2 --use_pretrained --seeds 3
  python main.py --eval --model_path results/model.pth --data_dir other_photos
  python main.py --sweep defence --arch mobilenet_v2 --use_pretrained
  python main.py --train_defence nopeek --arch mobilenet_v2 --use_pretrained --save_dir runs/nopeek
  python main.py --report runs/* --save_dir runs/report

@FILE reads flags from FILE (one or more a line, # comments); a flag after it overrides it. Presets of published
settings: '''


class Group:
    """An argument group (or parser) whose flags print their default once: appended to their help through
    argparse's public %(default)s unless the help already gives it or the flag has none (None, a switch's False)."""

    def __init__(self, group, flags=None):
        self.group = group
        self.flags = [] if flags is None else flags  # the parser's list of every flag, for its error hints

    def add_argument(self, *flags, **kwargs):
        default, help = kwargs.get('default'), kwargs.get('help') or ''
        if not any(default is none for none in (None, False, argparse.SUPPRESS)) and 'default' not in help:
            kwargs['help'] = help + ' (default: %(default)s)'
        action = self.group.add_argument(*flags, **kwargs)
        self.flags += action.option_strings
        return action

    def switch(self, flag, help, dest=None):
        """An on / off flag: `--flag` and `--no-flag`, so a flag after a preset (@FILE) can turn its setting off."""
        action = self.group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=False,
                                         help=help)
        self.flags += action.option_strings


class Parser(argparse.ArgumentParser):
    """argparse reading `@FILE` arguments (presets): flags as on the command line, one or more a line, `#` comments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flags = []

    def convert_arg_line_to_args(self, line):
        return resolve_presets(shlex.split(line, comments=True))

    def flag_group(self, title):
        """A titled group of flags whose help gives each default once (Group)."""
        return Group(self.add_argument_group(title), self.flags)

    def error(self, message):
        """One line and where to start, not the whole usage block; for a misspelt flag, the flags spelt nearest."""
        self.exit(2, f'usage: {USAGE}\nerror: {message}{self.hint(message)}\n')

    def hint(self, message):
        if message.startswith('unrecognized arguments:'):
            unknown = [token.split('=')[0] for token in message.split(':', 1)[1].split() if token.startswith('-')]
            nearest = {flag: difflib.get_close_matches(flag, self.flags, n=2, cutoff=0.7) for flag in unknown}
            return ''.join(f'; {flag}: did you mean {" or ".join(near)}?' for flag, near in nearest.items() if near)
        given = re.match(r"argument --defence: invalid choice: '?([\w-]+)", message)
        trained = given and given.group(1) in defences.TRAINED and given.group(1)
        if trained:
            return (f'; {trained} is a trained defence: --train_defence {trained} fine-tunes the victim against it '
                    'and writes defended_victim.pth, then --train --weights FOLDER/defended_victim.pth attacks it')
        return ''


def presets():
    """The names of this tool's presets (presets/NAME.args)."""
    return sorted(f[:-len(PRESET_SUFFIX)] for f in os.listdir(PRESETS_DIR) if f.endswith(PRESET_SUFFIX))


def resolve_presets(argv):
    """`@FILE` arguments as paths argparse can open: the file as given, else this tool's preset of that name
    (`@original` and `@presets/original.args` work from any folder); renamed flags and values under their new
    names."""
    return current_names([preset_path(arg) if arg.startswith('@') else arg for arg in argv])


def current_names(argv):
    """Flags (and values) under a name they had before, renamed to the current one with a one-line notice."""
    renamed = []
    for arg in argv:
        flag, eq, value = arg.partition('=')
        negated = flag.startswith('--no-')
        old = flag.removeprefix('--no-' if negated else '--')
        if flag.startswith('--') and old in RENAMED_FLAGS:
            new = ('--no-' if negated else '--') + RENAMED_FLAGS[old]
            print(f'note: {flag} is now {new} (the old name will be removed)', file=sys.stderr)
            flag, arg = new, new + eq + value
        renamed += [flag, value] if eq and flag.startswith('--') else [arg]  # --flag=value as two, for its value
    for i, arg in enumerate(renamed[1:], 1):
        key = renamed[i - 1].removeprefix('--')
        if renamed_value(key, arg) != arg:
            print(f'note: --{key} {arg} is now --{key} {renamed_value(key, arg)} (the old name will be removed)',
                  file=sys.stderr)
            renamed[i] = renamed_value(key, arg)
    return renamed


def preset_path(arg):
    name = arg[1:]
    stem = os.path.basename(name).removesuffix(PRESET_SUFFIX)
    if stem in RENAMED_PRESETS and not os.path.isfile(name):
        print(f'note: @{stem} is now @{RENAMED_PRESETS[stem]} (the same flags)', file=sys.stderr)
        stem = RENAMED_PRESETS[stem]
    for path in (name, os.path.join(PRESETS_DIR, stem + PRESET_SUFFIX)):
        if os.path.isfile(path):
            return '@' + path
    raise UsageError(f'{arg}: no such file; the presets are {", ".join(presets())} (@presets/NAME.args or @NAME)')


def build_parser():
    p = Parser(description=__doc__.splitlines()[0], usage=USAGE, allow_abbrev=False, fromfile_prefix_chars='@',
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=EXAMPLES + ', '.join(f'@{n}' for n in presets()) + ' (presets/)')
    mode = p.flag_group('what to do (one of these, or --attack optimize alone: the white-box attack, '
                                'which needs no decoder)')
    mode.add_argument('--train', action='store_true', help='train a decoder (then evaluate and draw figures)')
    mode.add_argument('--resume', action='store_true', help='continue training from --model_path X.ckpt')
    mode.add_argument('--eval', action='store_true', help='evaluate the model.pth or ckpt_N.ckpt at --model_path')
    mode.add_argument('--visualize', action='store_true', help='draw the figures for --model_path (.pth or .ckpt)')
    mode.add_argument('--list_splits', action='store_true',
                      help='list every cut of the victim (--arch or --victim) at --image_size: the tensor it sends, '
                           'its size relative to the image, and the default')
    mode.add_argument('--sweep', choices=SWEEPS, help='train and evaluate one decoder per --sweep_values value')
    mode.add_argument('--report', nargs='+', metavar='RUN',
                      help='one table and figure across finished runs and sweeps (folders or globs) into --save_dir')
    mode.add_argument('--model_path', help='a model.pth or ckpt_N.ckpt written by --train')
    mode.add_argument('--eval_split', choices=('val', 'test'), default='val',
                      help="what --eval / --visualize score on the training data: the images held "
                           "out at training (val), or CelebA's official test partition (test)")

    victim = p.flag_group('victim (frozen, cut at --split)')
    victim.add_argument('--arch', default='resnet18',
                        help='the torchvision image classifier the device runs: any of '
                             'torchvision.models.list_models(module=torchvision.models) (vit_b_16, convnext_tiny, '
                             'swin_t, efficientnet_b0, ...)')
    victim.add_argument('--victim', metavar='FILE.py:FUNCTION',
                        help='your own network instead: a function (FILE.py:FUNCTION or package.module:FUNCTION) '
                             'that returns an nn.Module from images to logits; imported only when named here, and '
                             'again on every --eval or --resume of its runs, which refuse a changed file')
    victim.add_argument('--normalize', default='imagenet', metavar='imagenet|none|MEAN,STD',
                        help='what the network expects of [0, 1] images: ImageNet normalisation, none, or a mean and '
                             'standard deviation (two numbers, or three of each)')
    victim.add_argument('--split', help='where the victim is cut: any node or module of its traced graph that cuts it '
                                         'in two (--list_splits lists them); named cuts: ' + '; '.join(
        f'{a}: {" ".join(SPLITS[a])} (default {DEFAULT_SPLIT[a]})' for a in SPLITS)
                        + '; other archs: the cut nearest the middle of the graph')
    victim.switch('--use_pretrained', "ImageNet weights (IMAGENET1K_V1) through torchvision's hub cache",
            dest='pretrained')
    victim.add_argument('--weights', help='a local state-dict file for the victim instead')

    attacker = p.flag_group('attacker (decoder)')
    spec = DecoderSpec()
    attacker.add_argument('--decoder', choices=DECODERS, default=spec.kind,
                          help="original: the original work's, unchanged (stride-2 transposed convs or bicubic "
                               "upsampling + convs); residual: residual blocks where the tensor arrives, then x2 "
                               "stages with a residual block each, narrowing to the image")
    attacker.add_argument('--interpolation', choices=sorted({i for kind in INTERPOLATIONS.values() for i in kind}),
                          help='how each x2 stage upsamples: ' + '; '.join(
                              f'{kind}: {", ".join(i)} (default {i[0]})' for kind, i in INTERPOLATIONS.items()))
    attacker.add_argument('--decoder_depth', choices=tuple(DECODER_DEPTHS), default=spec.depth,
                          help='capacity preset: original: base widths ' + ', '.join(
                              f'{d} {w}' for d, (w, _) in DECODER_DEPTHS.items()) + '; residual: width x blocks '
                          + ', '.join(f'{d} {w}x{b}' for d, (w, b) in RESIDUAL_DEPTHS.items()))
    attacker.add_argument('--decoder_width', type=int,
                          help='residual: channels where the tensor arrives, halved at each x2 stage (default from '
                               '--decoder_depth)')
    attacker.add_argument('--decoder_blocks', type=int,
                          help='residual: residual blocks at the arriving resolution (default from --decoder_depth)')
    attacker.add_argument('--decoder_norm', choices=NORMS, default=spec.norm,
                          help='residual: normalisation after each conv (group: independent of the batch size)')
    attacker.add_argument('--feature_weight', type=float, default=0.0,
                          help='white-box attacker: weight of a training term that re-encodes the reconstruction '
                               'with the frozen victim and penalises its relative distance to the sent tensor '
                               '(0: black-box, the victim\'s weights unknown)')

    data = p.flag_group('data')
    data.add_argument('--data_dir', help='folder of images, .zip of images, or CelebA root; none: built-in sample photos')
    data.add_argument('--image_size', type=int,
                      help=f'square side in pixels (default {USER_IMAGE_SIZE} with --data_dir, else {BUILTIN_IMAGE_SIZE})')
    data.add_argument('--num_batches', type=int, help='use num_batches x batch_size images, split 10:1 (default all)')
    data.add_argument('--batch_size', type=int, default=32, help='images per step')
    data.add_argument('--num_workers', type=int, default=2, help='processes decoding images into the cache')
    data.add_argument('--cache_dir', default=os.environ.get('RECON_CACHE_DIR', os.path.expanduser('~/.cache/recon-attack')),
                      help='where decoded images are cached (env RECON_CACHE_DIR)')
    data.add_argument('--feature_cache_gb', type=float, default=4.0,
                      help="cache the victim's clean features up to this size (0: off)")

    noise = p.flag_group('noise (variance, not std)')
    noise.switch('--train_noise', 'add Gaussian noise during training')
    noise.add_argument('--noise_mean', type=float, default=0.0, help='mean of the training noise')
    noise.add_argument('--noise_var', type=float, default=0.01, help='variance of the training noise')
    noise.switch('--test_noise', 'add Gaussian noise at evaluation / visualisation')
    noise.add_argument('--test_noise_mean', type=float, default=0.0, help='mean of the test noise')
    noise.add_argument('--test_noise_var', type=float, default=0.01, help='variance of the test noise')
    noise.add_argument('--noise_at', choices=('input', 'features'), default='input',
                       help='on the image before the victim, or on the intercepted tensor (a defence)')
    noise.add_argument('--noise_for_bound', type=float, metavar='DB',
                       help='noise on the tensor, in training and evaluation, of the variance at which the '
                            'unbiased-attacker PSNR ceiling (dFIL) on calibration training images is DB dB on average '
                            '(the mean of their per-image ceilings: about half of all images lie above it), or, '
                            'with --bound_quantile Q, at most DB dB on a share Q of them')
    noise.add_argument('--bound_quantile', type=float, metavar='Q',
                       help='with --noise_for_bound: calibrate so that a share Q in (0, 1) of the calibration '
                            'images have a ceiling at or below DB, instead of the mean')
    noise.add_argument('--noise_snr', type=float, metavar='DB',
                       help='noise on the tensor, in training and evaluation, DB dB below its centred power (the '
                            'mean variance of its elements across calibration training images): the noise model '
                            'under which a trained defence such as fil is judged, which no shift or scale of the '
                            'tensor can game')
    noise.add_argument('--prior_sigma', type=float, default=0.1,
                       help='the prior-aware (van Trees) bound holds for images from the training distribution '
                            'smoothed by Gaussian noise of this std (natural images have no finite Fisher '
                            'information of their own)')
    noise.add_argument('--fil_probes', type=int, default=16,
                       help='random probes per image of the dFIL estimate wherever the tensor carries noise')

    defences.add_arguments(p, mode)

    attack = p.flag_group('attacks (how the sent tensor is turned into an image when evaluating)')
    plan = AttackPlan()
    attack.add_argument('--attack', choices=ATTACKS, default=plan.kind,
                        help='; '.join(f'{kind}: {what}' for kind, what in ATTACKS.items()))
    attack.add_argument('--attack_steps', type=int, default=plan.steps, help='Adam steps of the optimisation attack')
    attack.add_argument('--attack_lr', type=float, default=plan.lr, help="learning rate of the optimisation attack")
    attack.add_argument('--tv_weight', type=float, default=plan.tv_weight,
                        help='weight of the total-variation prior against the relative feature error')

    sweep = p.flag_group('sweeps')
    sweep.add_argument('--sweep_values', nargs='+', metavar='VALUE',
                       help='values for --sweep (default: every split of the arch; keep_channels 1 0.5 0.25 0.125 '
                            '0.0625; noise_var 0 0.01 0.05 0.1 0.5)')

    train = p.flag_group('training')
    train.add_argument('--optim', choices=('adam', 'adamw', 'sgd'), default='adam',
                       help='optimizer (adam with --weight_decay is L2; adamw decouples it; sgd: momentum 0.9)')
    train.add_argument('--lr', type=float, default=1e-3, help='learning rate (the peak of a schedule)')
    train.add_argument('--weight_decay', type=float, default=0.0, help='weight decay')
    train.add_argument('--scheduler', choices=('none', 'cosine', 'step'), default='none',
                       help='cosine: linear warm-up then cosine decay to 0, per batch; step: the original work\'s '
                            'drops by --gamma every --step_size epochs')
    train.add_argument('--warmup_epochs', type=float, default=0.25, help='warm-up of the cosine schedule, in epochs')
    train.add_argument('--step_size', type=int, default=10, help='epochs between learning-rate drops (step)')
    train.add_argument('--gamma', type=float, default=0.1, help='learning-rate factor at each drop (step)')
    train.add_argument('--loss', choices=LOSSES, default='mse',
                       help='reconstruction loss: mse, l1, ssim (1 - SSIM), mix (0.84 (1 - SSIM) + 0.16 L1)')
    train.switch('--augment', "random flips and crops of the attacker's training images (each batch then "
            "queries the device's half for its features, so the feature cache is off)")
    train.add_argument('--ema', type=float, default=0.0,
                       help='decay of an exponential moving average of the decoder weights that the attack then '
                            'uses (e.g. 0.99; 0: off)')
    train.add_argument('--num_epochs', type=int, default=10, help='training epochs')
    train.add_argument('--stop_patience', type=int, default=0,
                       help='stop training when the PSNR on stopping images (drawn out of the training images, never '
                            'the ones reported) has not risen by --stop_delta for this many epochs; --num_epochs or '
                            '--minutes is then the cap (0: off). For --train_defence: its objective (KL + privacy term), '
                            'by that fraction of itself')
    train.add_argument('--stop_delta', type=float, default=0.05,
                       help='the rise in dB (for --train_defence: relative) that counts as improving')
    train.add_argument('--minutes', type=float,
                       help='train for about this many minutes instead: the first epoch is timed and --num_epochs '
                            'set to what fits (recorded); compares attackers at equal wall-clock time')
    train.switch('--sparse', "L1 penalty on the decoder's activations")
    train.add_argument('--sparse_reg', type=float, default=1e-4, help='weight of the --sparse penalty')
    train.add_argument('--log_interval', type=int, default=5,
                       help='epochs between ckpt_{epoch}.ckpt files (and --tensorboard image grids)')
    train.add_argument('--seed', type=int, default=0,
                       help="seeds the attacker: its decoder's initial weights, the data order and the noise")
    train.add_argument('--seeds', type=int, default=1,
                       help='--train, --sweep and --train_defence: run every setting at N seeds (--seed and the N - 1 '
                            'after it), each in SAVE_DIR/seed=S; tables give the mean over the seeds and their spread, '
                            'and call a difference real only where a paired 95 %% interval over the seeds excludes 0')
    train.add_argument('--split_seed', type=int, default=0,
                       help='seeds the train / held-out split (and the built-in crops), fixed while --seed varies, '
                            'so that runs over several seeds are scored on the same images')
    train.add_argument('--victim_seed', type=int, default=0,
                       help='seeds a random-initialised victim (without --use_pretrained or --weights)')
    train.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto', help='auto: CUDA when available')
    train.switch('--deterministic', 'deterministic CUDA kernels where PyTorch has them (torch.use_deterministic_'
                 'algorithms, warn only; cuBLAS workspace setting; no cuDNN autotuning), somewhat slower: GPU runs '
                 'repeat more closely, but not bit for bit where an operation has no deterministic kernel (bicubic '
                 'upsampling\'s and adaptive pooling\'s backward warn and stay as they are); CPU runs repeat anyway')
    train.add_argument('--precision', choices=('bf16', 'fp32'), default='bf16',
                       help='bf16: bf16 autocast where the hardware has bf16 arithmetic (CUDA; CPUs with '
                            'AVX512-BF16 or AMX), else fp32; metrics are always computed in fp32')
    train.switch('--compile', "torch.compile the victim's encoder and the decoder's training step")
    outputs = p.flag_group('outputs')
    outputs.add_argument('--save_dir', default='results', help='outputs; a folder holding a run gets a fresh _N sibling')
    outputs.switch('--overwrite', 'write into --save_dir even if it holds a run')
    outputs.switch('--tensorboard', 'also log the training curves and validation reconstructions (every '
            '--log_interval epochs) for TensorBoard, in --save_dir: tensorboard --logdir RUNS')
    outputs.add_argument('--num_samples', type=int, default=8, help='images in the sample grid')
    return p


def explicit_flags(parser, args, argv):
    """The destinations the user actually typed (to tell them from defaults): argv parsed again with the default of
    every destination in `args` replaced by a marker."""
    shadow, unset = copy.deepcopy(parser), object()
    shadow.set_defaults(**dict.fromkeys(vars(args), unset))
    return {dest for dest, value in vars(shadow.parse_args(argv)).items() if value is not unset}


def check_flags(parser, cfg):
    """The flags' values, checked once, before anything is built: one line naming the flag and what it takes."""
    positive = ('batch_size', 'num_epochs', 'image_size', 'log_interval', 'step_size', 'num_samples', 'attack_steps',
                'seeds')
    if cfg['fil_probes'] < 2:
        parser.error(f'argument --fil_probes: at least 2 (the estimate\'s standard error needs two), got '
                     f'{cfg["fil_probes"]}')
    if cfg['noise_for_bound'] is not None and not math.isfinite(cfg['noise_for_bound']):
        parser.error(f'argument --noise_for_bound: a PSNR ceiling in dB, got {cfg["noise_for_bound"]}')
    if cfg['noise_snr'] is not None and not math.isfinite(cfg['noise_snr']):
        parser.error(f'argument --noise_snr: a signal-to-noise ratio in dB, got {cfg["noise_snr"]}')
    if cfg['noise_snr'] is not None and cfg['noise_for_bound'] is not None:
        parser.error('argument --noise_snr: --noise_for_bound sets the noise too; choose one')
    if cfg['bound_quantile'] is not None and not 0 < cfg['bound_quantile'] < 1:
        parser.error(f'argument --bound_quantile: a share in (0, 1), got {cfg["bound_quantile"]:g}')
    if cfg['bound_quantile'] is not None and cfg['noise_for_bound'] is None:
        parser.error('argument --bound_quantile: it sets how --noise_for_bound calibrates; add --noise_for_bound DB')
    if not cfg['prior_sigma'] > 0:
        parser.error(f'argument --prior_sigma: a positive std, got {cfg["prior_sigma"]:g}')
    for key in positive + ('num_batches',):
        if cfg[key] is not None and cfg[key] < 1:
            parser.error(f'argument --{key}: must be at least 1, got {cfg[key]}')
    for key in ('noise_var', 'test_noise_var', 'lr', 'weight_decay', 'sparse_reg', 'feature_cache_gb', 'num_workers',
                'attack_lr', 'tv_weight', 'feature_weight', 'warmup_epochs', 'stop_patience', 'stop_delta'):
        if cfg[key] < 0:
            parser.error(f'argument --{key}: must not be negative, got {cfg[key]}')
    if cfg['minutes'] is not None and cfg['minutes'] <= 0:
        parser.error(f'argument --minutes: must be positive, got {cfg["minutes"]}')
    if not 0 <= cfg['ema'] < 1:
        parser.error(f'argument --ema: a decay in [0, 1) (0: off), got {cfg["ema"]}')
    for key in ('decoder_width', 'decoder_blocks'):
        if cfg[key] is not None and cfg['decoder'] != 'residual':
            parser.error(f'argument --{key}: for --decoder residual (the original decoder is set by --decoder_depth)')
        if cfg[key] is not None and cfg[key] < (1 if key == 'decoder_width' else 0):
            parser.error(f'argument --{key}: must be at least {1 if key == "decoder_width" else 0}, got {cfg[key]}')
    if cfg['image_size'] < 16:
        parser.error('argument --image_size: at least 16 pixels are needed (SSIM uses an 11-pixel window)')
    if cfg['num_batches'] is not None and cfg['num_batches'] < 2:
        parser.error('argument --num_batches: at least 2 (one batch is kept for validation)')
    if cfg['reference'] and not (cfg['weights'] or cfg['victim']):
        parser.error('--reference names the original victim that a defended victim (--weights, or a --victim of '
                     'your own) is charged against: give --weights too')
    check_arch(parser, cfg)


def check_arch(parser, cfg):
    """--arch names a torchvision classifier, unless --victim names a network of your own."""
    archs = torchvision.models.list_models(module=torchvision.models)
    if not cfg['victim'] and cfg['arch'] not in archs:
        close = difflib.get_close_matches(str(cfg['arch']), archs, n=2)
        parser.error(f'argument --arch: {cfg["arch"]} is not one of torchvision\'s image classifiers'
                     + (f' (did you mean {" or ".join(close)}?)' if close else '')
                     + '; torchvision.models.list_models(module=torchvision.models) lists them, and --victim takes '
                       'a network of your own')


def check_config(parser, config):
    """What the flags make together, checked on the built configuration: the decoder, the cut, the defences."""
    victim, image_size = config.victim, config.data.image_size
    try:
        normalisation(victim.normalize)
        check(config.decoder)
        check_cut(victim, image_size)
        defences.check_flags(config.defence, cut_at(victim, image_size))
    except UsageError as e:
        parser.error(str(e))


class Command(NamedTuple):
    """What the command line asks for: the mode, the run's configuration (a config.Config) and what a loaded
    checkpoint (`state`) derived, and the mode's own arguments."""
    mode: str
    config: Config
    derived: Derived = Derived()
    state: dict = None
    model_path: str = None
    eval_split: str = 'val'
    sweep: str = None
    sweep_values: list = None
    seeds: int = 1
    report: list = None


def resolve_config(parser, args, argv):
    """The run's Command: the checkpoint's configuration where one is loaded (flags may not contradict it), else
    the flags'."""
    given = explicit_flags(parser, args, argv)
    cfg = vars(args).copy()
    modes = [m for m in MODES if cfg[m]]
    if not modes and cfg['attack'] == 'optimize':
        modes = ['attack']  # the white-box attack needs no trained decoder: it is a run of its own
    if len(modes) != 1:
        parser.error(f'choose exactly one of {", ".join("--" + m for m in MODES)}, or --attack optimize alone '
                     f'(got {", ".join("--" + m for m in modes) or "none"})')
    mode = modes[0]
    command = {key: cfg[key] for key in ('model_path', 'eval_split', 'sweep', 'sweep_values', 'seeds', 'report')}
    for key in ('victim', 'reference'):  # functions of your own, by their files' absolute paths
        if cfg[key] and is_entry_point(cfg[key]):
            cfg[key] = entry_point(cfg[key])
    if cfg['victim']:
        if 'arch' not in given:
            cfg['arch'] = None  # the network is the user's own
    cfg['image_size'] = cfg['image_size'] or (USER_IMAGE_SIZE if cfg['data_dir'] else BUILTIN_IMAGE_SIZE)
    if mode == 'list_splits':
        check_arch(parser, cfg)
        return Command(mode, from_flags(cfg))
    if mode == 'report':
        extra = given - {'report'} - RUN_KEYS  # how a run is carried out does not matter here
        if extra:
            parser.error(f'--report reads finished runs: it takes folders, --save_dir and --overwrite, not '
                         f'{", ".join("--" + k for k in sorted(extra))}')
        return Command(mode, from_flags(cfg), **command)
    if cfg['sweep_values'] and mode != 'sweep':
        parser.error('--sweep_values needs --sweep')
    if cfg['seeds'] > 1 and mode not in ('train', 'sweep', 'train_defence'):
        parser.error(f'--seeds is for --train, --sweep and --train_defence (what trains), not --{mode}')
    if 'eval_split' in given and mode not in ('eval', 'visualize'):
        parser.error('--eval_split is for --eval and --visualize')
    state = None
    if mode not in ('train', 'sweep', 'attack', 'train_defence'):
        if not cfg['model_path']:
            parser.error(f'--{mode} needs --model_path FILE')
        if mode == 'resume' and not cfg['model_path'].endswith('.ckpt'):
            parser.error(f'--resume needs a training checkpoint (ckpt_N.ckpt), not {cfg["model_path"]}')
        state = load_checkpoint(cfg['model_path'], need_optimizer=mode == 'resume')
        saved = {**vars(parser.parse_args([])), **state['config']}  # flags newer than the file: their defaults
        if saved['victim'] and 'victim' not in given:  # never import code that a file alone names
            raise UsageError(f'{cfg["model_path"]} attacks a network of your own: name it again with --victim '
                             f'{saved["victim"]} (its code is imported only when the command line names it)')
        resuming = mode == 'resume'  # goes on as it was trained: only how it runs, and its length, may change
        fixed = given - RUN_KEYS - set(MODES) - {'num_epochs'} if resuming else set(MODEL_KEYS) & given
        for key in sorted(fixed):
            if not same_setting(key, cfg[key], saved[key]):
                fix = ('--resume goes on as the run was trained; change it in a new --train run' if resuming else
                       'drop the flag or pick another --model_path')
                raise UsageError(f'--{key} {cfg[key]} contradicts the checkpoint {cfg["model_path"]}, trained with '
                                 f'{key}={saved[key]}; {fix}')
        applied = COMMAND_KEYS | (RUN_KEYS & given) | ({'num_epochs'} & given if resuming else given)
        cfg = {**saved, **{k: cfg[k] for k in applied}}
        if 'save_dir' not in given:
            cfg['save_dir'] = default_save_dir(mode, cfg['model_path'], cfg['eval_split'])
    else:
        if cfg['data_dir'] and 'image_size' not in given:
            print(f'image size: {USER_IMAGE_SIZE} px, the default with --data_dir ({BUILTIN_IMAGE_SIZE} px with the '
                  'built-in photos); --image_size to change it')
        if not cfg['split']:
            check_arch(parser, cfg)
            cfg['split'] = default_split(from_flags(cfg).victim, cfg['image_size'])
    calibrated = [k for k in ('noise_for_bound', 'noise_snr') if cfg[k] is not None]
    overridden = sorted(given & defences.NOISE_KEYS) if calibrated else []
    if overridden:
        parser.error(f'argument --{calibrated[0]} sets the noise on the tensor itself (the run\'s own): drop '
                     f'--{overridden[0]}')
    check_flags(parser, cfg)
    config, derived = from_record(cfg)
    check_config(parser, config)
    return Command(mode, config, derived, state, **command)


def default_save_dir(mode, model_path, eval_split):
    """Beside the file: resuming writes into its run's folder; an evaluation or a drawing into a folder of its own
    (eval_ckpt_5, eval_model_test, visualize_model, ...), so that it never replaces the record or the figures of
    the run or of another evaluation."""
    folder = os.path.dirname(os.path.abspath(model_path))
    if mode == 'resume':
        return folder
    stem = os.path.splitext(os.path.basename(model_path))[0]
    return os.path.join(folder, f'{mode}_{stem}' + ('_test' if eval_split == 'test' else ''))


def idle_flags(config, derived=Derived()):
    """The flags that made no difference to a run: the mode flags, and those its other flags leave without effect
    (so that a table of runs shows only settings that acted)."""
    return set(MODES) | record_idle_flags(config, derived)


def entry_point(entry):
    """--victim with its file's absolute path, so that a run's record names it wherever it is read."""
    where, _, function = entry.rpartition(':')
    return f'{os.path.abspath(where)}:{function}' if where.endswith('.py') else entry


def same_setting(key, given, saved):
    """A flag agrees with the checkpoint; paths by the folder they name (data, ./data and data/ agree)."""
    if key in ('data_dir', 'weights') and given and saved:
        return os.path.realpath(given) == os.path.realpath(saved)
    return given == saved


def run(argv):
    parser = build_parser()
    named = [a for a in argv if a.startswith('@')]
    argv = resolve_presets(argv)
    command = resolve_config(parser, parser.parse_args(argv), argv)
    config, mode = command.config, command.mode
    if config.runtime.deterministic:
        make_deterministic()
    device = pick_device(config.runtime.device)
    if init_distributed(device):
        world = rank_and_world()[1]
        if mode not in ('train', 'resume'):
            raise UsageError(f'torchrun runs --train and --resume; run --{mode} as a single process')
        if config.data.batch_size % world:
            raise UsageError(f'--batch_size {config.data.batch_size} is the global batch: it must split evenly over '
                             f'the {world} processes')
        if not is_main_process():
            sys.stdout = open(os.devnull, 'w')  # rank 0 speaks for all
    save_dir = config.outputs.save_dir
    if mode in NEW_RECORDS and not config.outputs.overwrite:
        chosen = same_on_all_processes(fresh_run_dir(save_dir))
        if chosen != save_dir:
            print(f'{save_dir} already holds a run: writing to {chosen} (--overwrite to reuse it)')
        command = command._replace(config=replace(config, outputs=replace(config.outputs, save_dir=chosen)))
    if mode == 'list_splits':
        print(list_splits(config.victim, config.data.image_size))
        return
    if mode == 'report':
        write_report(command.report, command.config.outputs.save_dir, idle_flags)
        print(f'outputs written to {os.path.abspath(command.config.outputs.save_dir)}')
        return
    if config.data.data_dir is None:
        print('data: built-in sample photos (no --data_dir); for CelebA pass --data_dir /path/to/celeba')
        for preset in named:
            print(f'note: {preset} describes a published setting on its own data; the built-in photos stand in for '
                  f'it here, so this is a smoke run, not that setting\'s figures')
    if config.victim.random:
        print(f'victim: {victim_name(config.victim)} {victim_label(config.victim)} (--use_pretrained or --weights for '
              'trained weights)')
    if where_noise := noise_line(config.noise):
        print(where_noise)
    try:
        dispatch(command, device)
    except torch.cuda.OutOfMemoryError:
        batch_size = config.data.batch_size
        raise RunError(f'the {device.type.upper()} ran out of memory at --batch_size {batch_size}: try '
                       f'--batch_size {max(1, batch_size // 2)} (or a smaller --feature_cache_gb / '
                       f'--image_size); checkpoints already written are intact') from None
    print(f'outputs written to {os.path.abspath(command.config.outputs.save_dir)}')


def dispatch(command, device):
    config, derived, state, mode = command.config, command.derived, command.state, command.mode
    if command.seeds > 1 and mode in ('train', 'train_defence'):  # a sweep runs its values' seeds itself
        run_seeds(config, command.seeds, device, defence=mode == 'train_defence')
    elif mode in ('train', 'resume'):
        train_and_evaluate(config, device, state if mode == 'resume' else None, derived)
    elif mode == 'attack':
        splits = load_splits(config.data, weights=config.victim.weights, stopping=bool(config.training.stop_patience))
        attack, derived = build_attack(config, device, splits.calibration_images(config.data.batch_size))
        bound = run_bound(attack, derived.noise(config.noise), splits.calibration_images(PRIOR_IMAGES),
                          config.training.seed)
        run_attack(attack, splits.validation(), config, derived, bound=bound, mean_image=mean_training_image(splits))
    elif mode == 'sweep':
        run_sweep(config, command.sweep, command.sweep_values, command.seeds, device)
    elif mode == 'train_defence':
        train_defence(config, device)
    else:
        scored = evaluation_images(config.data, state, config.victim.weights, command.eval_split)
        attack = load_trained_attack(state, device, config, derived, command.model_path)
        mean = mean_image(state, config.data)
        if mode == 'eval':
            print(f'evaluating {command.model_path} ({checkpoint_epochs(state)}) on {scored.description}')
            if config.attack.kind != 'decoder':
                print(f"the checkpoint's --attack {config.attack.kind} runs {config.attack.steps} Adam steps on every "
                      'image (minutes on a CPU); --attack decoder evaluates the decoder alone')
            noise = derived.noise(config.noise)
            splits = training_splits(state, config.data, 'prior-aware bound') if noise.testing() else None
            bound = run_bound(attack, noise, splits and splits.calibration_images(PRIOR_IMAGES), config.training.seed)
            run_attack(attack, scored, config, derived,
                       {'model_path': os.path.abspath(command.model_path), 'epoch': state['epoch']}, state['history'],
                       bound, mean_image=mean)
        else:
            print(f'drawing {command.model_path} ({checkpoint_epochs(state)}) on {scored.description}')
            draw_all(attack, scored, config, derived, state.get('history'), config.outputs.save_dir, mean_image=mean)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f'usage: {USAGE}\n{START}')
        return
    try:
        run(argv)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except RunError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr)
        sys.exit(130)
